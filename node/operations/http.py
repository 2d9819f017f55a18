"""Health and Prometheus metrics over HTTP (Starlette), bound to 127.0.0.1 by default.

``GET /health`` answers 200 with the JSON report of :func:`node.operations.health.health_report`
while the node listens and can store, else 503 with the same report (its ``problems`` say why);
``GET /live`` answers 200 while the DICOM port listens, else 503: a liveness probe that restarts
the node only when a restart can help (a full disk fails ``/health``, not ``/live``).
``GET /metrics`` answers in the Prometheus text format (or OpenMetrics, as the scraper asks).
Served by :class:`node.operations.webserver.BackgroundServer`. Nothing here carries patient data.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["status_app"]


def status_app(health: Callable[[], dict], registry: CollectorRegistry,
               live: Callable[[], bool] = lambda: True) -> Starlette:
    """The ASGI app of ``/health``, ``/live`` and ``/metrics``.

    Parameters
    ----------
    health : callable
        Returns the health report; ``{"status": "ok", ...}`` means healthy.
    live : callable
        Whether the node's DICOM port listens (``/live``).
    registry : CollectorRegistry
        What ``/metrics`` exposes.
    """

    def health_endpoint(request: Request) -> JSONResponse:
        report = health()
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503,
                            headers={"Cache-Control": "no-store"})

    def live_endpoint(request: Request) -> JSONResponse:
        alive = live()
        return JSONResponse({"status": "alive" if alive else "not listening"}, status_code=200 if alive else 503,
                            headers={"Cache-Control": "no-store"})

    def metrics_endpoint(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    # Plain (sync) endpoints: Starlette runs them on the server's bounded thread pool, so the
    # SQLite reads never block its event loop.
    return Starlette(routes=[Route("/health", health_endpoint), Route("/live", live_endpoint),
                             Route("/metrics", metrics_endpoint)])
