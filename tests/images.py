"""Reference images for tests, and an HTTP server on 127.0.0.2 (the allowlisted test host) serving them."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

TEST_HOST = "127.0.0.2"


def picture(
    width: int = 320, height: int = 192, color: tuple[int, int, int] = (200, 40, 90), fmt: str = "PNG"
) -> bytes:
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 16):  # some structure, so encoders have work to do
        image.paste((x % 255, 255 - x % 255, 80), (x, 0, x + 8, height))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def bomb() -> bytes:
    """A tiny PNG that claims 20,000 × 20,000 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def image_server(redirect_target: str, files: dict[str, bytes] | None = None) -> Iterator[str]:
    """The routes below, and `files` (path → bytes, served as application/octet-stream)."""
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/ref.png": (200, {"Content-Type": "image/png"}, picture()),
        "/wide.jpg": (200, {"Content-Type": "image/jpeg"}, picture(512, 256, fmt="JPEG")),
        "/text.png": (200, {"Content-Type": "image/png"}, b"this is not an image"),
        "/bomb.png": (200, {"Content-Type": "image/png"}, bomb()),
        "/huge.png": (200, {"Content-Type": "image/png"}, b"\0" * (11 << 20)),
        "/missing.png": (404, {}, b"nope"),
        "/to-loopback": (302, {"Location": redirect_target}, b""),
        "/to-ref": (302, {"Location": "/ref.png"}, b""),
    } | {path: (200, {"Content-Type": "application/octet-stream"}, data) for path, data in (files or {}).items()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow.png":
                time.sleep(5)
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # The fetcher stops reading at its size bound (/huge.png), as it should.
            with suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((TEST_HOST, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{TEST_HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
