"""Where offline tasks run: in this process, or on a Dask cluster (``dask.distributed``).

- :class:`InlineExecutor` runs the tasks one after the other in this process (``--workers 0``);
  it is the reference a distributed run must agree with.
- :class:`DaskExecutor` starts a local cluster of worker processes (the default) or connects to
  an existing scheduler (``--scheduler tcp://HOST:PORT``: workers started by ``dask worker``,
  dask-jobqueue on SLURM/PBS, or Dask on Kubernetes). Each worker process runs one task at a
  time and loads the segmenter once (:class:`node.orchestration.study_task.SegmenterPlugin`).
  When a worker dies, the scheduler gives its task to another worker; a task whose workers died
  ``distributed.scheduler.allowed-failures`` times (3 by default) comes back as an error.

Both yield ``(index, result, error)`` as tasks finish, in any order; exactly one of result and
error is None.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

from .study_task import ModelSpec, SegmenterPlugin

__all__ = ["ClusterError", "DaskExecutor", "InlineExecutor", "describe_error"]


class ClusterError(Exception):
    """The Dask cluster could not be started or reached."""


def describe_error(error: BaseException) -> str:
    """A failed task's error in words."""
    if type(error).__name__ == "KilledWorker":
        return ("its worker process died while processing it, on every worker that tried"
                " (a crash, or out of memory); see the workers' logs")
    return f"{type(error).__name__}: {error}"


class InlineExecutor:
    """Runs tasks in this process, in order."""

    workers = 0

    def __enter__(self) -> "InlineExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map_unordered(self, function: Callable[[Any], Any], items: Sequence[Any],
                      resources: Mapping[str, float] | None = None) -> Iterator[tuple[int, Any, BaseException | None]]:
        for index, item in enumerate(items):
            try:
                yield index, function(item), None
            except Exception as error:  # the study task catches its own; this is a bug in the caller
                yield index, None, error

    def worker_memory(self) -> dict[str, int]:
        """Peak resident memory (bytes) of each worker process: here, this process."""
        return {"this process": _peak_rss()}


def _peak_rss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class DaskExecutor:
    """Runs tasks on Dask workers.

    Parameters
    ----------
    model : ModelSpec
        Loaded once in every worker process when it starts.
    scheduler : str, optional
        Address of an existing scheduler (``tcp://HOST:PORT``); without it, a local cluster.
    workers : int
        Worker processes of the local cluster (one task at a time each).
    connect_timeout : float
        Seconds to reach the scheduler.
    """

    def __init__(self, model: ModelSpec, scheduler: str | None = None, workers: int = 1,
                 connect_timeout: float = 30) -> None:
        self.model = model
        self.scheduler = scheduler
        self.workers = workers
        self.connect_timeout = connect_timeout
        self.client = None
        self.cluster = None

    def __enter__(self) -> "DaskExecutor":
        from distributed import Client, LocalCluster

        try:
            if self.scheduler:
                self.client = Client(self.scheduler, timeout=f"{self.connect_timeout}s")
            else:
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
        except (OSError, TimeoutError) as exc:
            self.__exit__(None, None, None)
            where = self.scheduler or f"a local cluster of {self.workers} workers"
            raise ClusterError(f"cannot use {where}: {exc}") from exc
        try:
            self.client.register_plugin(SegmenterPlugin(self.model), name=SegmenterPlugin.name)
        except Exception as exc:
            self.__exit__(None, None, None)
            raise ClusterError(f"the workers cannot load the model {self.model.name}: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def map_unordered(self, function: Callable[[Any], Any], items: Sequence[Any],
                      resources: Mapping[str, float] | None = None) -> Iterator[tuple[int, Any, BaseException | None]]:
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        futures = {
            self.client.submit(function, item, key=f"{getattr(function, '__name__', 'task')}-{run}-{index}",
                               pure=False, resources=dict(resources) if resources else None): index
            for index, item in enumerate(items)
        }
        try:
            for future in as_completed(futures):
                index = futures[future]
                try:
                    result = future.result()
                except Exception as error:
                    yield index, None, error
                else:
                    yield index, result, None
                future.release()
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()

    def worker_memory(self) -> dict[str, int]:
        """Peak resident memory (bytes) of each worker process, by worker address."""
        return self.client.run(_peak_rss)
