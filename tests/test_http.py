"""The health and metrics endpoint under misbehaving clients, and its report of the disk.

Raw sockets on 127.0.0.1 against a node process: idle and half-sent HTTP connections must be
closed by the server and must not stop ``/health`` from answering, nor cost a thread each; a
node whose disk is below its watermark must fail its health check and say why.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from email.message import Message

from tests.dicomfiles import sample

IDLE_CONNECTIONS = 300
#: A bound on waiting for the server to close a connection (its idle time-out is 5 s); the test
#: waits for the close, it does not time it.
CLOSE_WITHIN = 60


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Message, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


def _closed_by_server(connection: socket.socket) -> bool:
    connection.settimeout(CLOSE_WITHIN)
    try:
        while True:
            data = connection.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_closed_and_health_still_answers(node_factory) -> None:
    node = node_factory()
    status, _, body = _get(node.http_port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    threads_before = _threads(node.process.pid)

    connections = [socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
                   for _ in range(IDLE_CONNECTIONS)]
    # Some send half a request and then nothing, as a slow client (or an attack) would.
    for connection in connections[::10]:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        status, _, body = _get(node.http_port, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        # No thread per connection: the server's event loop holds them, and its worker threads
        # are a fixed few.
        assert _threads(node.process.pid) <= threads_before + 2
        still_open = sum(not _closed_by_server(c) for c in connections)
        assert still_open == 0, f"{still_open} of {IDLE_CONNECTIONS} idle connections were not closed by the server"
    finally:
        for connection in connections:
            connection.close()
    status, _, body = _get(node.http_port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_health_fails_below_the_disk_watermark(node_factory) -> None:
    # More free space than any disk has: the node is below its watermark from the start.
    node = node_factory(node={"min_free_mb": 2**40})
    stored = node.storescu([sample("explicit VR little endian")])
    assert stored.returncode != 0 or "0xa700" in (stored.stdout + stored.stderr).lower()
    node.wait_for(lambda s: s["associations"] and s["associations"][0]["outcome"], what="association ended")

    status, headers, body = _get(node.http_port, "/health")
    report = json.loads(body)
    assert status == 503 and report["status"] == "failing"
    assert report["dicom"] is True and report["can_store"] is False
    assert report["disk"]["min_free_mb"] == 2**40 and report["disk"]["free_mb"] < 2**40
    assert any("node.min_free_mb" in problem and "C-STORE is refused" in problem for problem in report["problems"])
    assert report["last_association"]["calling_ae"] == "STORESCU"
    assert report["last_association"]["refused"] == 1 and report["last_association"]["stored"] == 0

    status, headers, metrics = _get(node.http_port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "musclenode_can_store 0.0" in metrics
    # Not ready, but alive: a restart would not free the disk, so the liveness probe passes.
    status, _, body = _get(node.http_port, "/live")
    assert status == 200 and json.loads(body)["status"] == "alive"
    assert "musclenode_instances_received_total 0.0" in metrics
    status, headers, metrics = _get(node.http_port, "/metrics", {"Accept": "application/openmetrics-text"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and metrics.endswith("# EOF\n")


def test_requests_beyond_the_limit_are_answered_busy_at_once() -> None:
    import threading

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from node.operations.webserver import BackgroundServer

    release = threading.Event()
    arrived = threading.Semaphore(0)

    async def slow(request):
        arrived.release()
        await run_in_threadpool(release.wait, 60)
        return PlainTextResponse("done")

    server = BackgroundServer(Starlette(routes=[Route("/slow", slow)]), "127.0.0.1", 0, "test", threads=2,
                              max_requests=2)
    server.start()
    answers: list[int] = []
    clients = [threading.Thread(target=lambda: answers.append(_get(server.port, "/slow")[0])) for _ in range(2)]
    try:
        for client in clients:
            client.start()
        assert arrived.acquire(timeout=30) and arrived.acquire(timeout=30)
        status, headers, body = _get(server.port, "/slow")
        assert status == 503 and headers.get("Retry-After") == "1" and "busy" in body
    finally:
        release.set()
        for client in clients:
            client.join(timeout=30)
        server.stop()
    assert answers == [200, 200]
