"""Health and Prometheus metrics over HTTP, bound to 127.0.0.1 by default.

``GET /health`` answers 200 with a small JSON body while the node is serving; ``GET /metrics``
answers in the Prometheus text format. Nothing here carries patient data.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

__all__ = ["StatusServer", "prometheus_text"]


def prometheus_text(values: dict[str, tuple[str, str, dict[tuple[tuple[str, str], ...], float]]]) -> str:
    """Metrics as Prometheus text: name -> (type, help, {labels: value})."""
    lines = []
    for name, (kind, description, samples) in values.items():
        lines.append(f"# HELP {name} {description}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples.items():
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return "\n".join(lines) + "\n"


class StatusServer:
    """A small threaded HTTP server for ``/health`` and ``/metrics``.

    Parameters
    ----------
    host, port : str, int
        Where to listen (port 0 picks a free one; see :attr:`port`).
    health : callable
        Returns a JSON-serialisable dict; ``{"status": "ok"}`` means healthy.
    metrics : callable
        Returns the Prometheus text.
    """

    def __init__(self, host: str, port: int, health: Callable[[], dict], metrics: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                if self.path == "/health":
                    body = health()
                    self._answer(200 if body.get("status") == "ok" else 503, "application/json",
                                 json.dumps(body).encode())
                elif self.path == "/metrics":
                    self._answer(200, "text/plain; version=0.0.4", metrics().encode())
                else:
                    self._answer(404, "text/plain", b"not found\n")

            def _answer(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the node's own log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
