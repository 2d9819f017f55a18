"""The heap of a process that runs study after study: its long-lived objects kept out of the
cyclic garbage collector's way.

A worker (the node's worker threads, a cohort's Dask worker, ``process`` in one process) keeps
for its whole life what its first study brought in: modules imported on first use (matplotlib,
highdicom's tables), font and code caches, the model's session. CPython's cyclic collector walks
every tracked object at each full (generation 2) collection, and building one study's SR and
summary allocates enough objects to set off one or two of them: on the real Dixon study
(``bench/study_cpu.py``) 0.17 CPU s per study went to full collections. After the first study,
:func:`settle_after_first_study` collects once and moves everything then alive into the
permanent generation (:func:`gc.freeze`; Python documentation, "gc - Garbage Collector
interface"), which later collections skip: 0.07 s per study. Objects are still freed by
reference counting as before; only reference cycles among the frozen objects would stay, once.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["settle_after_first_study"]

_lock = threading.Lock()
_settled = False


def settle_after_first_study() -> bool:
    """Once per process, after its first study: a full collection, then :func:`gc.freeze`.

    Returns
    -------
    bool
        True for the call that settled the heap, False for every later one (nothing is done).
    """
    global _settled
    with _lock:
        if _settled:
            return False
        _settled = True
    gc.collect()
    gc.freeze()
    return True
