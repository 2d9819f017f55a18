"""A node's data folder, read and acted on from outside the DICOM path.

``musclenode status``, ``retry`` and ``resend``, the health and metrics endpoint and the dashboard
all go through :class:`NodeState`: what arrived, what was decided, the jobs and the deliveries of
their results, and the actions on them. It opens its own SQLite connections (WAL lets them read
while the node writes), so that nothing here waits on, or makes wait, the connections of the
storage SCP and the workers.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import Config, Destination
from ..storage.deliveries import ExportQueue
from ..storage.index import Index
from ..storage.jobs import Job, JobQueue

__all__ = ["NodeState", "resolve_destination"]


def resolve_destination(config: Config, text: str) -> Destination:
    """A configured destination by name, or ``AE@host:port`` for a one-off destination.

    Raises
    ------
    ValueError
        If ``text`` is neither, with the configured names in the message.
    """
    destination = next((d for d in config.destinations if d.name == text), None)
    if destination is not None:
        return destination
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d+)", text)
    if match is None:
        names = ", ".join(d.name for d in config.destinations) or "none configured"
        raise ValueError(f"unknown destination {text!r} (configured: {names}; or give AE@host:port)")
    try:
        return Destination(name=text, ae_title=match.group(1), host=match.group(2), port=int(match.group(3)))
    except ValueError as exc:  # pydantic's ValidationError
        raise ValueError(f"{text!r} is not a destination: {exc}") from None


class NodeState:
    """The index, job queue and delivery queue of one data folder, on connections of its own.

    Parameters
    ----------
    config : Config
        The node's configuration (data folder, destinations).

    Notes
    -----
    Thread-safe: each queue serialises its own connection.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.index = Index(config.index_path)
        self.jobs = JobQueue(config.index_path)
        self.exports = ExportQueue(config.index_path, config.data)

    def close(self) -> None:
        self.index.close()
        self.jobs.close()
        self.exports.close()

    def __enter__(self) -> "NodeState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def status_report(self, associations: int = 10, jobs: int = 20) -> dict[str, Any]:
        """What ``musclenode status`` shows: counts, recent associations, every series with its
        latest decision, recent jobs with the deliveries of their results."""
        decisions = self.index.latest_decisions()
        return {
            "data": str(self.config.data.resolve()),
            "counts": self.index.counts(),
            "associations": self.index.associations(limit=associations),
            "series": [{**s.__dict__, "decision": decisions.get(s.series_uid)} for s in self.index.all_series()],
            "jobs": [
                {**job.__dict__, "deliveries": [d.__dict__ for d in self.exports.for_job(job.id)]}
                for job in self.jobs.jobs(limit=jobs)
            ],
            "job_counts": self.jobs.counts(),
            "export_counts": self.exports.counts(),
        }

    def last_association(self) -> dict[str, Any] | None:
        recent = self.index.associations(limit=1)
        return recent[0] if recent else None

    # -- actions --------------------------------------------------------------------------------

    def retry_job(self, job_id: int) -> Job:
        """Queue a failed or done job again (``musclenode retry``).

        Raises
        ------
        KeyError
            No such job.
        ValueError
            The job is queued, running or superseded.
        """
        return self.jobs.retry(job_id)

    def resend(self, job_id: int, destination: str) -> tuple[int, Destination]:
        """Queue every result of a job for a destination again (``musclenode resend``).

        Returns how many files and the destination they go to.

        Raises
        ------
        ValueError
            Unknown destination.
        KeyError
            The job has no results.
        """
        target = resolve_destination(self.config, destination)
        return self.exports.resend(job_id, target), target

    def send_now(self, destination: str | None = None, job_id: int | None = None) -> int:
        """Make the pending deliveries of a destination (and/or job) due now; returns how many."""
        return self.exports.send_now(destination=destination, job_id=job_id)
