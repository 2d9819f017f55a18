"""Deterministic UIDs for results.

A result's UIDs are derived from the UIDs of the source series it was made from, the model's name
and version, the software version and what the object is, so that processing the same series
again (a retry, a restart, a re-send, or a series that gained instances) makes objects with the
same UIDs, which a PACS files as replacements rather than duplicates. A new model or software
version makes new objects beside the old ones, as it should: they are different results.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

__all__ = ["ResultIdentity", "derive_uid"]

#: The UUID-derived root of PS3.5 B.2: any 128-bit number under 2.25 is a valid, unique UID.
_UUID_ROOT = "2.25."


def derive_uid(*parts: str) -> str:
    """A UID under 2.25 made from a hash of ``parts``; the same parts give the same UID."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    # 128 bits, as a UUID would have, keeps the UID within 64 characters (2.25. + 39 digits).
    return _UUID_ROOT + str(int.from_bytes(digest[:16], "big"))


class ResultIdentity:
    """The UIDs of every object made from one set of source series by one model.

    Parameters
    ----------
    source_series : iterable of str
        Series Instance UIDs of the inputs (all Dixon components used, or the single series).
    model : str
        Model name and version, e.g. ``"musclenode-lumbar-dixon 1.0.0"``.
    software_version : str
    """

    def __init__(self, source_series: Iterable[str], model: str, software_version: str) -> None:
        self._base = ("musclenode", ",".join(sorted(source_series)), model, software_version)

    def uid(self, *what: str) -> str:
        """The UID of one thing, e.g. ``uid("seg", "series")`` or ``uid("summary", "instance", "2")``."""
        return derive_uid(*self._base, *what)
