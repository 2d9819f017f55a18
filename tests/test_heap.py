"""The heap settles once per process, after its first study (reports/heap.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def test_the_first_call_collects_and_freezes_and_later_calls_do_nothing() -> None:
    # In a process of its own: freezing pytest's heap would outlive this test.
    code = ("import gc, threading; from reports.heap import settle_after_first_study as settle; "
            "assert gc.get_freeze_count() == 0; "
            "results = []; threads = [threading.Thread(target=lambda: results.append(settle())) for _ in range(4)]; "
            "[t.start() for t in threads]; [t.join() for t in threads]; "
            "assert sorted(results) == [False, False, False, True], results; "
            "frozen = gc.get_freeze_count(); assert frozen > 1000, frozen; "
            "assert settle() is False and gc.get_freeze_count() == frozen; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
