"""An ASGI application served by Hypercorn on its own thread and event loop inside the node process.

The health and metrics endpoint and the dashboard each run one. The DICOM side never waits on
them: they have their own thread, their own asyncio loop and their own SQLite connections.

Why Hypercorn and not uvicorn: a connection that is opened and then sends nothing, or only part
of a request, must be closed after a short idle time, or anyone who can reach the port holds a
slot for as long as they like. Hypercorn's ``keep_alive_timeout`` runs from the moment a
connection is accepted until a whole request has arrived (and again between requests), so such
connections are closed. uvicorn 0.54 starts its keep-alive timer only after the first response:
a connection that never completes a request is never closed (measured here, and
https://github.com/Kludex/uvicorn/pull/1192).

Bounds:

- idle connections, and requests that arrive too slowly, are closed after ``idle_seconds``;
- one event-loop thread, and at most ``threads`` worker threads for blocking work (SQLite reads,
  image rendering) through anyio's thread limiter;
- at most ``max_requests`` requests in progress at once; more are answered 503 at once instead of
  queueing (as uvicorn's ``limit_concurrency`` does).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Awaitable, Callable

import anyio.to_thread
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

__all__ = ["BackgroundServer", "IDLE_SECONDS"]

#: Seconds a connection may stay idle (before its first request, between requests, or while a
#: request trickles in) before the server closes it. Hypercorn's default; browsers and scrapers
#: open a new connection when theirs was closed.
IDLE_SECONDS = 5.0

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class _RequestLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in progress; the next ones get 503 at once."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            body = b"busy: too many requests in progress, try again\n"
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _ThreadLimit:
    """ASGI middleware: sets anyio's default thread limiter of the server's loop at start-up."""

    def __init__(self, app: ASGIApp, threads: int) -> None:
        self.app = app
        self.threads = threads

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            anyio.to_thread.current_default_thread_limiter().total_tokens = self.threads
        await self.app(scope, receive, send)


class BackgroundServer:
    """Serve an ASGI app on ``host:port`` from a daemon thread.

    Parameters
    ----------
    app : ASGI application
    host, port : str, int
        Where to listen. The socket is bound here, in the caller's thread, so that a port in use
        raises ``OSError`` at once; port 0 picks a free port (see :attr:`port`).
    name : str
        The thread's name and the logger's suffix (``node.http.NAME``).
    idle_seconds : float
        See :data:`IDLE_SECONDS`.
    threads : int
        Worker threads for blocking work.
    max_requests : int
        Requests in progress at once.

    Raises
    ------
    OSError
        If the address cannot be bound.
    """

    def __init__(self, app: ASGIApp, host: str, port: int, name: str, *, idle_seconds: float = IDLE_SECONDS,
                 threads: int = 4, max_requests: int = 64) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            # Listening from here on: connections made before the loop runs wait in the backlog.
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.host = host
        self.port = int(sock.getsockname()[1])
        self.name = name
        config = HypercornConfig()
        # Hypercorn takes the socket over by its file descriptor (and closes it when it stops).
        config.bind = [f"fd://{sock.detach()}"]
        config.keep_alive_timeout = idle_seconds
        config.backlog = 128
        # No read_timeout: it would also cut responses that stream for long (server-sent events).
        config.graceful_timeout = 2
        config.accesslog = None
        config.errorlog = logging.getLogger(f"node.http.{name}")
        config.include_server_header = False
        self._config = config
        self._app: Any = _ThreadLimit(_RequestLimit(app, max_requests), threads)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"http-{name}", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await serve(self._app, self._config, shutdown_trigger=self._stop.wait, mode="asgi")

        try:
            asyncio.run(main())
        except Exception:
            logging.getLogger(f"node.http.{self.name}").exception("the %s server stopped", self.name)
        finally:
            self._started.set()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
