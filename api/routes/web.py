"""The playground (`/`), the operators' console (`/console`) and the API reference (`/docs`, Swagger UI): static
files shipped in the packages (api/static; Swagger UI's dist files from the pinned `fastapi-offline`, under
/static/vendor), no build step, nothing fetched from elsewhere. Their Content-Security-Policy allows scripts,
styles and requests from this origin only, and no inline script or style: data is only ever text, and a key
kept in sessionStorage is read by no third party's script.

`/redoc` leads to `/docs`: Redoc's standalone build styles itself with inline <style>, starts its search worker
from a blob: URL and loads its logo from Redocly's CDN, none of which that policy allows."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
VENDOR = Path(fastapi_offline.__file__).resolve().parent / "static"  # swagger-ui-bundle.js, swagger-ui.css …
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["web"], include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=HEADERS)


@router.get("/console")
async def console() -> FileResponse:
    return FileResponse(STATIC / "console.html", headers=HEADERS)


@router.get("/docs")
async def swagger_ui() -> FileResponse:
    return FileResponse(STATIC / "docs.html", headers=HEADERS)


@router.get("/redoc")
async def redoc() -> RedirectResponse:
    return RedirectResponse("/docs", status_code=308)


class Assets(StaticFiles):
    """/static/…: the pages' scripts and styles, with the same headers (a script served as another type is
    refused by the browser: nosniff)."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


assets = Assets(directory=STATIC, check_dir=False)
vendor = Assets(directory=VENDOR)
