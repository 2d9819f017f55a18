"""Opaque ids for studies in the dashboard's addresses.

A Study Instance UID can identify a patient's examination, so it never appears in a URL: a study
is named by a keyed hash (HMAC-SHA256) of its UID instead. The key lives in the data folder
(``dashboard.key``, readable by the node only), so that links stay valid across restarts and
cannot be computed by anyone without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Iterable

__all__ = ["StudyIds", "load_key"]


def load_key(path: Path) -> bytes:
    """The key in ``path``; made (32 random bytes, mode 0600) if the file does not exist."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex())
    return key


class StudyIds:
    """Study UID <-> opaque id (22 URL-safe characters)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def opaque(self, study_uid: str) -> str:
        digest = hmac.new(self._key, study_uid.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def find(self, opaque: str, study_uids: Iterable[str]) -> str | None:
        """The study UID among ``study_uids`` whose opaque id is ``opaque``, or ``None``."""
        return next((uid for uid in study_uids if hmac.compare_digest(self.opaque(uid), opaque)), None)
