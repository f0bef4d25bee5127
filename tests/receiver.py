"""Real webhook receivers on 127.0.0.2 (the allowlisted test host): `Receiver` records every request it gets and
answers as the test scripts it (a status per request, a delay, a redirect); `Trickler` never finishes answering
and records how long each connection stayed open."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.images import TEST_HOST


@dataclass
class Received:
    at: float  # time.monotonic()
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """`answers(n)` → (status, delay_s, extra headers) for the n-th request (0-based); 200 by default."""

    answers: Callable[[int], tuple[int, float, dict[str, str]]] = lambda n: (200, 0.0, {})
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{TEST_HOST}:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    n = len(receiver.received)
                    receiver.received.append(Received(time.monotonic(), self.path, dict(self.headers), body))
                status, delay_s, headers = receiver.answers(n)
                time.sleep(delay_s)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((TEST_HOST, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout_s: float = 90.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} of {count} webhook requests arrived in {timeout_s} s")
            time.sleep(0.02)
        return self.received


@dataclass
class Connection:
    webhook_id: str
    opened: float  # time.monotonic(), once the request was read
    closed: float | None = None
    hung_up: bool = False  # the client closed it (else the trickle ran its course)


@dataclass
class Trickler:
    """Takes each request, then answers 200 one byte every `every_s`, for at most `for_s` s: `slow(n)` says for
    the n-th request whether the status line itself trickles ("head") or, after prompt headers, the body
    ("body"). Each connection's opening and end are recorded."""

    slow: Callable[[int], str] = lambda n: "head"
    every_s: float = 0.5
    for_s: float = 20.0
    connections: list[Connection] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{TEST_HOST}:{self._server.server_address[1]}/hook"

    def start(self) -> Trickler:
        trickler = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with trickler._lock:
                    n = len(trickler.connections)
                    connection = Connection(self.headers.get("webhook-id", ""), time.monotonic())
                    trickler.connections.append(connection)
                head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
                at_once, slowly = (b"", head + b"x" * 1000) if trickler.slow(n) == "head" else (head, b"x" * 1000)
                connection.hung_up = self._trickle(at_once, slowly)
                connection.closed = time.monotonic()
                self.close_connection = True

            def _trickle(self, at_once: bytes, slowly: bytes) -> bool:
                """Whether the client hung up before the trickle ran its course."""
                sock = self.connection
                until = time.monotonic() + trickler.for_s
                try:
                    sock.sendall(at_once)
                    for byte in slowly:
                        sock.sendall(bytes([byte]))
                        wait = min(trickler.every_s, until - time.monotonic())
                        if wait <= 0 or trickler._stopping.is_set():
                            return False
                        if select.select([sock], [], [], wait)[0] and not sock.recv(1):
                            return True  # end of stream: the client closed its side
                except OSError:  # reset or broken pipe
                    return True
                return False

            def log_message(self, *_: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((TEST_HOST, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def most_open_at_once(self, webhook_id: str | None = None) -> int:
        """The most connections that were open at one moment (of one delivery, given its id)."""
        now = time.monotonic()
        spans = [(c.opened, c.closed or now) for c in self.connections if webhook_id in (None, c.webhook_id)]
        return max((sum(1 for start, end in spans if start <= at < end) for at, _ in spans), default=0)

    def open_now(self) -> int:
        return sum(1 for c in self.connections if c.closed is None)

    def wait_ended(self, count: int, timeout_s: float) -> list[Connection]:
        """The first `count` connections, once each has ended."""
        deadline = time.monotonic() + timeout_s
        while len(self.connections) < count or any(c.closed is None for c in self.connections[:count]):
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} connections had not ended in {timeout_s} s: {self.connections}")
            time.sleep(0.05)
        return self.connections[:count]
