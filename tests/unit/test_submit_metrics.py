"""Every route that creates predictions, of every dialect, is counted in `klein_submits_total`: the set is the
app's own routes marked with api.infra.metrics.submit_route, so a new dialect's route cannot be missed by a list
kept elsewhere."""

from __future__ import annotations

from fastapi.routing import APIRoute
from prometheus_client import REGISTRY

from api.app import create_app
from api.infra import metrics

# POST routes that create no prediction: each new POST route is one or the other, on purpose.
NOT_SUBMITS = {
    "/v1/predictions/{prediction_id}/cancel",
    "/v1/files",
    "/v1/keys",
    "/v1/webhooks/default/secret/rotate",
    "/v1/webhooks/deliveries/{delivery_id}/replay",
    "/admin/v1/tenants",
    "/admin/v1/tenants/{tenant_id}/keys",
    "/admin/v1/workers/{name}/drain",
    "/admin/v1/tenants/{tenant_id}/suspend",
    "/admin/v1/tenants/{tenant_id}/resume",
    "/admin/v1/predictions/{prediction_id}/cancel",
    "/admin/v1/predictions/{prediction_id}/requeue",  # runs a stored prediction again: no new one
    "/admin/v1/predictions/requeue",
    "/admin/v1/webhooks/deliveries/{delivery_id}/replay",
    "/admin/v1/webhooks/deliveries/replay",
    "/v1/prompts/enhance",  # a prompt rewrite (docs/enhancer.md), its own job
    "/v1/prompts/enhance/{job_id}/cancel",
    "/v1/batches",  # a batch's predictions are made later, by the feeder (core/batches.py): no submit of its own
    "/v1/batches/{batch_id}/cancel",
}
DIALECTS = {"pruna", "replicate", "klein", "wavespeed", "1min", "openai", "fal", "bfl"}


def post_routes() -> list[APIRoute]:
    return [route for route in create_app().routes if isinstance(route, APIRoute) and "POST" in (route.methods or ())]


def test_every_post_route_that_creates_predictions_is_counted() -> None:
    counted = {route.path for route in post_routes() if metrics.is_submit(route)}
    assert {"/api/v3/{model_path:any_path}", "/v1/models/{owner}/{name}/predictions"} <= counted
    assert {route.path for route in post_routes()} - counted == NOT_SUBMITS
    assert {route.tags[0] for route in post_routes() if metrics.is_submit(route)} == DIALECTS, "each dialect's"


def test_a_wavespeed_and_a_replicate_model_path_submit_count_with_their_dialect() -> None:
    routes = {route.path: route for route in post_routes()}
    for path, dialect in (
        ("/api/v3/{model_path:any_path}", "wavespeed"),
        ("/v1/models/{owner}/{name}/predictions", "replicate"),
    ):
        labels = {"dialect": dialect, "outcome": "accepted", "reason": ""}
        before = REGISTRY.get_sample_value("klein_submits_total", labels) or 0.0
        metrics.record({"route": routes[path], "method": "POST", "state": {}}, 201, 0.01)
        assert REGISTRY.get_sample_value("klein_submits_total", labels) == before + 1, path


def test_a_try_sync_wait_counts_by_how_it_ended_and_the_answers_status() -> None:
    """The service notes answered/pending/not_waited; the answer's status tells a 201 fallback from a 504."""
    routes = {route.path: route for route in post_routes()}
    cases = [
        ("/v1/predictions", "pruna", "answered", 200, "answered"),
        ("/v1/predictions", "pruna", "pending", 201, "fell_back"),
        ("/v1/images/generations", "openai", "pending", 504, "timed_out"),
        ("/v1/images/generations", "openai", "answered", 500, "answered"),  # final in time, though failed
        ("/v1/predictions", "pruna", "not_waited", 201, "not_waited"),
    ]
    for path, dialect, noted, status, outcome in cases:
        labels = {"dialect": dialect, "outcome": outcome}
        before = REGISTRY.get_sample_value("klein_sync_waits_total", labels) or 0.0
        metrics.record({"route": routes[path], "method": "POST", "state": {"klein_sync_wait": noted}}, status, 0.1)
        assert REGISTRY.get_sample_value("klein_sync_waits_total", labels) == before + 1, (path, noted, status)


def test_scrapes_and_probes_are_not_counted_as_requests() -> None:
    routes = {getattr(route, "path", ""): route for route in create_app().routes}
    for path in ("/metrics", "/healthz", "/readyz"):
        metrics.record({"route": routes[path], "method": "GET", "state": {}}, 200, 0.01)
    counted = {s.labels["route"] for f in REGISTRY.collect() if f.name == "klein_http_requests" for s in f.samples}
    assert not counted & {"/metrics", "/healthz", "/readyz"}
    metrics.record({"route": routes["/v1/keys"], "method": "GET", "state": {}}, 200, 0.01)
    assert REGISTRY.get_sample_value("klein_http_requests_total", {"route": "/v1/keys", "method": "GET",
                                     "dialect": "account", "status": "200"})  # fmt: skip
