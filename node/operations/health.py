"""The node's health: can it receive and store, what waits in its queues, when did a peer last call.

One pure function makes the report from what the node measured, so that ``GET /health``, the
dashboard's health page and the tests read the same thing. Nothing here carries patient data.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

__all__ = ["health_report"]


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def health_report(*, listening: bool, free_bytes: int, min_free_bytes: int, jobs: Mapping[str, int],
                  deliveries: Mapping[str, int], last_association: Mapping[str, Any] | None) -> dict[str, Any]:
    """The health report.

    Parameters
    ----------
    listening : bool
        The storage SCP accepts associations.
    free_bytes, min_free_bytes : int
        Free space on the data folder's file system, and the watermark ``node.min_free_mb`` in
        bytes: below it every C-STORE is refused (0xA700).
    jobs, deliveries : mapping
        Jobs and result deliveries by state.
    last_association : mapping or None
        The most recent association (``calling_ae``, ``address``, ``started``, ``ended``,
        ``outcome``, ``instances``, ``failures``), or ``None``.

    Returns
    -------
    dict
        ``status`` is ``"ok"`` when the node listens and can store, else ``"failing"`` with the
        reasons in ``problems``; the endpoint answers 503 then.
    """
    can_store = free_bytes >= min_free_bytes
    problems = []
    if not listening:
        problems.append("the DICOM port is not listening")
    if not can_store:
        problems.append(f"free disk {free_bytes // 2**20} MiB is below node.min_free_mb"
                        f" ({min_free_bytes // 2**20} MiB): every C-STORE is refused")
    last = None
    if last_association is not None:
        last = {
            "calling_ae": last_association.get("calling_ae"),
            "address": last_association.get("address"),
            "started": _when(last_association.get("started")),
            "ended": _when(last_association.get("ended")),
            "outcome": last_association.get("outcome") or "open",
            "stored": last_association.get("instances"),
            "refused": last_association.get("failures"),
        }
    return {
        "status": "ok" if not problems else "failing",
        "problems": problems,
        "dicom": listening,
        "can_store": can_store,
        "disk": {"free_mb": free_bytes // 2**20, "min_free_mb": min_free_bytes // 2**20},
        "jobs": dict(jobs),
        "deliveries": dict(deliveries),
        "last_association": last,
    }
