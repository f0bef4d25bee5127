"""The API with three more inputs on the distilled model than the product has, for the playground's tests: the
form is built from the served schema, so fields it has never seen must appear, with their description, default
and range, and be sent. Run as `uvicorn tests.e2e.schema_extra_app:create_app --factory`; the fields are
accepted and stored with the input, and the worker, which runs GenerationParams, never sees them."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from pydantic import Field

from api.app import create_app as product_app
from models import registry
from models.klein import KleinInput

EXTRA = {
    "test_strength": "How strongly nothing happens (a field only this test's schema has).",
    "test_mode": "A choice only this test's schema has.",
    "test_flag": "A switch only this test's schema has.",
}


class InputWithExtras(KleinInput):
    test_strength: float = Field(0.5, ge=0, le=2, description=EXTRA["test_strength"])
    test_mode: Literal["calm", "wild"] = Field("calm", description=EXTRA["test_mode"])
    test_flag: bool = Field(False, description=EXTRA["test_flag"])


def create_app() -> FastAPI:
    # The spec is frozen for the product's sake; this process alone serves the wider schema.
    object.__setattr__(registry.FLUX_KLEIN_4B, "input_model", InputWithExtras)
    return product_app()
