"""Logging: structured (one JSON object a line) by default, and an audit trail of who sent what
and where results went.

Log lines carry no patient identifiers unless ``node.log_patient_data`` is set: the node logs
counts, AE titles, addresses, states and reasons, never names, IDs or dates of birth. The audit
log (``audit.log`` in the data folder) records every association (accepted, rejected, ended, with
counts) and every export (sent or failed, with the destination), for the hospital's records.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["JsonFormatter", "audit", "setup"]

_AUDIT = logging.getLogger("musclenode.audit")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...}``, plus the record's ``fields`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str, log_format: str, data: Path | None) -> None:
    """Configure the root logger (to standard output, where container engines and journald collect
    it) and, when a data folder is given, the audit log in it."""
    handler = logging.StreamHandler(sys.stdout)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if data is not None:
        audit_handler = logging.FileHandler(Path(data) / "audit.log")
        audit_handler.setFormatter(JsonFormatter())
        _AUDIT.handlers[:] = [audit_handler]
        _AUDIT.setLevel(logging.INFO)
        _AUDIT.propagate = False


def audit(event: str, **fields: Any) -> None:
    """One audit record: an event name and its fields (no patient data)."""
    _AUDIT.info(event, extra={"fields": {"event": event, **fields}})
