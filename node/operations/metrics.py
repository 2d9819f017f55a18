"""Prometheus metrics of the node, through ``prometheus_client``.

A custom collector reads the node's counts when Prometheus scrapes (the index, the queues and
two counters of the running node), so the values are the node's own, not a second set kept in
step with them. Nothing here carries patient data.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric

from .state import NodeState

__all__ = ["NodeCollector", "node_registry"]


class NodeCollector:
    """Collects the node's metrics at each scrape (``prometheus_client``'s custom collector API).

    Parameters
    ----------
    state : NodeState
        Read on its own SQLite connections.
    inference_seconds, export_failures : callable
        Counters of the running node (the workers' and the exporter's).
    free_bytes : callable
        Free space on the data folder's file system.
    min_free_bytes : int
        The watermark ``node.min_free_mb``, in bytes.
    """

    def __init__(self, state: NodeState, *, inference_seconds: Callable[[], float],
                 export_failures: Callable[[], int], free_bytes: Callable[[], int], min_free_bytes: int) -> None:
        self.state = state
        self.inference_seconds = inference_seconds
        self.export_failures = export_failures
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes

    def collect(self) -> Iterator[Metric]:
        counts = self.state.index.counts()
        yield CounterMetricFamily("musclenode_instances_received", "Instances stored and indexed.",
                                  value=counts["instances"])
        yield GaugeMetricFamily("musclenode_series_ready", "Series assembled (quiet time over, association ended).",
                                value=counts["series_ready"])
        jobs = GaugeMetricFamily("musclenode_jobs", "Jobs by state.", labels=["state"])
        for state, number in self.state.jobs.counts().items():
            jobs.add_metric([state], number)
        yield jobs
        quality = GaugeMetricFamily("musclenode_segmentation_quality",
                                    "Done jobs by their segmentation quality verdict (pass, limited: images "
                                    "excluded, not measured).", labels=["verdict"])
        for verdict, number in self.state.jobs.quality_counts().items():
            quality.add_metric([verdict], number)
        yield quality
        yield CounterMetricFamily("musclenode_inference_seconds", "Seconds spent segmenting.",
                                  value=self.inference_seconds())
        yield CounterMetricFamily("musclenode_export_failures", "Failed deliveries of results (each is retried).",
                                  value=self.export_failures())
        exports = GaugeMetricFamily("musclenode_exports", "Result deliveries by state.", labels=["state"])
        for state, number in self.state.exports.counts().items():
            exports.add_metric([state], number)
        yield exports
        free = self.free_bytes()
        yield GaugeMetricFamily("musclenode_disk_free_bytes", "Free space on the data folder's file system.",
                                value=free)
        yield GaugeMetricFamily("musclenode_disk_watermark_bytes",
                                "node.min_free_mb: below this free space every C-STORE is refused.",
                                value=self.min_free_bytes)
        yield GaugeMetricFamily("musclenode_can_store", "1 while free disk is above the watermark, else 0.",
                                value=1 if free >= self.min_free_bytes else 0)


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) holding only the node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
