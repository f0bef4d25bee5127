"""The playground (`/`) and the operators' console (`/console`): static files shipped in the package
(api/static), no build step, nothing fetched from elsewhere. Their Content-Security-Policy allows scripts,
styles and requests from this origin only, and no inline script or style: data is only ever text."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
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


class Assets(StaticFiles):
    """/static/…: the pages' scripts and styles, with the same headers (a script served as another type is
    refused by the browser: nosniff)."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


assets = Assets(directory=STATIC, check_dir=False)
