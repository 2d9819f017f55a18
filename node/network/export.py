"""Export: results go to their destinations by C-STORE, each destination with its own retries.

The :class:`Exporter` takes due deliveries from :class:`node.storage.deliveries.ExportQueue`, sends
them over one association per destination, and marks each acknowledged or failed (to be retried
with backoff).
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Mapping

from pydicom import dcmread
from pynetdicom import AE

from ..operations.logs import audit
from ..storage.deliveries import Delivery, ExportQueue

__all__ = ["Exporter"]

log = logging.getLogger(__name__)


class Exporter:
    """Sends due deliveries, one association per destination, in a background thread."""

    def __init__(self, queue: ExportQueue, ae_title: str, poll_seconds: float = 1.0,
                 tls: Mapping[str, ssl.SSLContext] | None = None) -> None:
        self.queue = queue
        self.ae_title = ae_title
        #: TLS client contexts by destination name (``tls = true`` in [[destinations]]).
        self.tls = dict(tls or {})
        self.poll_seconds = poll_seconds
        self.failures = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        """Send now rather than at the next poll (new results are waiting)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("export round failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def send_due(self) -> None:
        for destination, deliveries in self.queue.due().items():
            if self._stop.is_set():
                return
            try:
                self._send(destination, deliveries)
            except Exception as exc:  # e.g. a host name that does not resolve: this destination
                # waits with its backoff; the others are still served in this round.
                log.debug("export to %s failed", destination, exc_info=True)
                self._failed(destination, deliveries, f"{type(exc).__name__}: {exc}")

    def _send(self, destination: str, deliveries: list[Delivery]) -> None:
        first = deliveries[0]
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for sop_class in sorted({d.sop_class_uid for d in deliveries}):
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        context = self.tls.get(destination)
        tls_args = (context, first.host) if context is not None else None
        assoc = ae.associate(first.host, first.port, ae_title=first.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "no association (destination down?)"
            self._failed(destination, deliveries, why)
            return
        sent, failed = [], []
        try:
            for delivery in deliveries:
                try:
                    status = assoc.send_c_store(dcmread(self.queue.root / delivery.path))
                except Exception as exc:  # a file or network problem fails this delivery, not the loop
                    failed.append((delivery, f"{type(exc).__name__}: {exc}"))
                    if not assoc.is_established:
                        break
                    continue
                code = getattr(status, "Status", None)
                if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                    sent.append(delivery.id)
                else:
                    failed.append((delivery, "no response" if code is None else f"status 0x{code:04X}"))
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            self.queue.mark_sent(sent)
            log.info("exported %d results to %s", len(sent), destination)
            for delivery in deliveries:
                if delivery.id in sent:
                    audit("result exported", job=delivery.job_id, destination=destination, ae_title=delivery.ae_title,
                          host=delivery.host, port=delivery.port, kind=delivery.kind,
                          sop_instance_uid=delivery.sop_instance_uid)
        for delivery, error in failed:
            self._failed(destination, [delivery], error)
        # Deliveries after a lost association were never tried.
        handled = set(sent) | {delivery.id for delivery, _ in failed}
        unsent = [d for d in deliveries if d.id not in handled]
        if unsent:
            self._failed(destination, unsent, "association lost")

    def _failed(self, destination: str, deliveries: list[Delivery], error: str) -> None:
        self.failures += len(deliveries)
        self.queue.mark_failed([d.id for d in deliveries], error)
        log.warning("export of %d results to %s failed: %s; will retry", len(deliveries), destination, error)
        audit("export failed", destination=destination, results=len(deliveries), error=error,
              jobs=sorted({d.job_id for d in deliveries}))
