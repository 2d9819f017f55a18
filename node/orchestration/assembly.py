"""Series assembly: a series is ready when it has been quiet for its quiet time and every
association that delivered to it has ended.

Timers live in APScheduler, one per series, and are rebuilt from the index when the node starts,
so a restart loses no pending series. When a series becomes ready, the selection rules judge its
whole study again (a Dixon partner may just have arrived) and the decisions are recorded.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from ..config import Config
from .headers import parse_header, summarise
from ..storage.index import Index
from .rules import Decision, SeriesHeaders, decide_study

__all__ = ["Assembler"]

log = logging.getLogger(__name__)

ReadyCallback = Callable[[str, list[Decision]], None]


class Assembler:
    """Quiet-time timers for series, and the selection rules when one is ready.

    Parameters
    ----------
    index : Index
        The node's index.
    config : Config
        Quiet times and rules.
    on_ready : callable, optional
        Called with the study UID and its new decisions after a series became ready.
    """

    def __init__(self, index: Index, config: Config, on_ready: ReadyCallback | None = None) -> None:
        self.index = index
        self.config = config
        self.on_ready = on_ready
        self.scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            executors={"default": {"type": "threadpool", "max_workers": 2}},
        )

    def start(self) -> None:
        """Start the timers, first resuming those of series that were pending at the last stop."""
        interrupted = self.index.end_interrupted_associations()
        if interrupted:
            log.info("marked %d associations left open by the previous run as interrupted", interrupted)
        self.scheduler.start()
        for series in self.index.pending_series():
            self.schedule(series.series_uid)

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)

    def association_ended(self, series_uids: list[str]) -> None:
        """Start the quiet-time timers of the series an association delivered to."""
        for uid in series_uids:
            self.schedule(uid)

    def schedule(self, series_uid: str) -> None:
        """(Re)arm the timer of a series for the end of its quiet time."""
        series = self.index.series(series_uid)
        if series is None or series.state == "ready":
            return
        due = series.last_received + self.config.quiet_seconds_for(series.calling_ae, series.address)
        self.scheduler.add_job(
            self._check,
            "date",
            run_date=datetime.fromtimestamp(max(due, time.time()), tz=timezone.utc),
            args=(series_uid,),
            id=series_uid,
            replace_existing=True,
        )

    def _check(self, series_uid: str) -> None:
        try:
            self.check(series_uid)
        except Exception:  # a timer thread must never die silently; the next event re-arms it
            log.exception("assembly check of a series failed")

    def check(self, series_uid: str, now: float | None = None) -> bool:
        """Mark the series ready if it is; return whether it became ready now."""
        series = self.index.series(series_uid)
        if series is None or series.state == "ready":
            return False
        if series.open_associations:
            return False  # its association's end re-arms the timer
        now = time.time() if now is None else now
        due = series.last_received + self.config.quiet_seconds_for(series.calling_ae, series.address)
        if due > now:
            self.schedule(series_uid)
            return False
        if not self.index.mark_ready(series_uid, series.version):
            self.schedule(series_uid)  # an instance arrived meanwhile
            return False
        log.info("series ready: %d instances, version %d", series.instances, series.version)
        decisions = self.judge_study(series.study_uid)
        if self.on_ready is not None:
            self.on_ready(series.study_uid, decisions)
        return True

    def _summaries(self, series_uid: str) -> list[dict]:
        """Header summaries of a series' instances, made now for those received since last time."""
        instances = self.index.instances(series_uid, with_header_bytes=True)
        missing = {
            i["sop_instance_uid"]: summarise(parse_header(i["header_bytes"], i["transfer_syntax"]))
            for i in instances if i["header"] is None
        }
        if missing:
            self.index.set_headers(missing)
        return [i["header"] or missing[i["sop_instance_uid"]] for i in instances]

    def judge_study(self, study_uid: str) -> list[Decision]:
        """Apply the rules to the ready series of a study and record the decisions that changed."""
        known = self.index.study_series(study_uid)
        ready = [s for s in known if s.state == "ready"]
        headers = [
            SeriesHeaders(s.series_uid, s.study_uid, s.version, tuple(self._summaries(s.series_uid)))
            for s in ready
        ]
        # Fallbacks (an in-phase/opposed-phase pair, a Dixon component alone) wait for the series
        # still arriving: a water/fat partner among them would make them give way.
        decisions = decide_study(headers, self.config.rules, still_arriving=len(known) - len(ready))
        latest = self.index.latest_decisions(study_uid)
        changed = [
            d for d in decisions
            if (previous := latest.get(d.series_uid)) is None
            or (previous["version"], previous["reason"], bool(previous["selected"])) != (d.version, d.reason, d.selected)
        ]
        if changed:
            self.index.record_decisions([d.as_row() for d in changed])
        for decision in changed:
            log.info("%s series: %s", "selected" if decision.selected else "skipped", decision.reason)
        return decisions
