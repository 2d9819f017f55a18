"""Event-driven waiting for the node's own SCP associations, instead of pynetdicom's 1-ms polling.

pynetdicom runs two loops per association: the DUL thread, which sleeps 1 ms whenever it finds
nothing to do before it looks at the socket and its send queue again, and the association's
reactor, which sleeps 1 ms before every look at its DIMSE message queue. Between a C-STORE's last
PDU and its response these sleeps add 1 to 3 ms per instance, several times what the node's own
handler spends with one fsync (``bench/receive_rate.py``; README, "Receive rate").

Here both waits end as soon as there is something to do, through pynetdicom's public classes:

- :class:`PromptDUL` (a :class:`pynetdicom.dul.DULServiceProvider`) runs the same loop as its
  parent's ``run_reactor`` but, where the parent sleeps, waits in ``select`` on the association's
  socket and on a pipe that :meth:`PromptDUL.send_pdu` and :meth:`PromptDUL.kill_dul` write to, with
  a timeout (:data:`IDLE_WAIT_S`) so that its timers are still checked.
- :class:`BulkSocket` (a :class:`pynetdicom.transport.AssociationSocket`) reads a PDU with as
  few ``recv`` calls as the kernel allows, where its parent reads 4 KiB at a time (80 system
  calls, each after a ``poll``, for one 320 KiB instance).
- :class:`PromptDIMSE` (a :class:`pynetdicom.dimse.DIMSEServiceProvider`) answers the reactor's
  non-blocking ``get_msg`` by waiting up to :data:`MESSAGE_WAIT_S` for the next message, so the
  reactor is woken by the message itself rather than by its next poll.

:func:`make_prompt` puts them into an association that the server has made and not yet started
(the handler of ``EVT_CONN_OPEN``), so that nothing else in the process changes: the exporter's
and the cohort tools' associations keep stock pynetdicom. The loop is copied from the pynetdicom
versions in :data:`KNOWN_VERSIONS`; on any other version :func:`make_prompt` leaves the
association as it is and logs a warning once.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import threading
from typing import TYPE_CHECKING, Any

import pynetdicom
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["BulkSocket", "IDLE_WAIT_S", "KNOWN_VERSIONS", "MESSAGE_WAIT_S", "PromptDIMSE", "PromptDUL", "make_prompt"]

log = logging.getLogger(__name__)

#: pynetdicom release series whose DUL loop :class:`PromptDUL` reproduces (3.0.x: ``dul.py``,
#: ``DULServiceProvider.run_reactor``).
KNOWN_VERSIONS: tuple[str, ...] = ("3.0.",)

#: Longest wait of the DUL loop with nothing on the socket or the send queue, in seconds: how often
#: it still looks at its ARTIM and idle timers and at a request to stop.
IDLE_WAIT_S = 0.05

#: Longest wait of the association's reactor for a DIMSE message, in seconds, before it looks for
#: a release, an abort or the end of the DUL again.
MESSAGE_WAIT_S = 0.005

_warned = threading.Event()


class PromptDUL(DULServiceProvider):
    """pynetdicom's DUL service provider that waits for its socket or its send queue instead of
    sleeping (see the module)."""

    def __init__(self, assoc: "Association") -> None:
        super().__init__(assoc)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed (the loop has ended)

    def _wait(self) -> None:
        """Until the socket has data, something was queued to send, or :data:`IDLE_WAIT_S`."""
        watched: list[Any] = [self._wake_read]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes that select cannot see
            watched.append(sock)
        if not self.to_provider_queue.empty():
            return
        try:
            select.select(watched, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            return  # the socket was closed meanwhile: the loop finds out
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def run_reactor(self) -> None:
        """The parent's loop (pynetdicom 3.0 ``dul.py``), with :meth:`_wait` where it sleeps."""
        try:
            self._reactor()
        finally:
            for fd in (self._wake_read, self._wake_write):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _reactor(self) -> None:
        self._idle_timer.start()
        wait = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True
            if wait:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As the parent does: an A-ABORT straight on the socket, and both loops end.
                log.error("pynetdicom DUL error, aborting the association: %s", exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None:
                    self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                wait = True
                continue
            self.state_machine.do_action(event)
            wait = False


class BulkSocket(AssociationSocket):
    """pynetdicom's association socket, reading whatever the kernel holds up to what was asked
    for in each ``recv`` (see the module)."""

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the socket, or fewer if the connection ends first (as the parent)."""
        data = bytearray(nr_bytes)
        view = memoryview(data)
        read = 0
        sock = self.socket
        while read < nr_bytes and sock is not None:
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:
                break
            read += got
        view.release()
        del data[read:]
        return data


class PromptDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE service provider whose non-blocking ``get_msg`` waits briefly for the
    next message (see the module)."""

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=MESSAGE_WAIT_S)
        except queue.Empty:
            return None, None


def make_prompt(assoc: "Association") -> bool:
    """Give an accepted association that has not started yet a :class:`PromptDUL` and a
    :class:`PromptDIMSE`; ``False`` (and a warning, once) on a pynetdicom version this module was
    not written for, which keeps stock pynetdicom."""
    installed = getattr(pynetdicom, "__version__", "?")
    if not installed.startswith(KNOWN_VERSIONS):
        if not _warned.is_set():
            _warned.set()
            log.warning("pynetdicom %s is not one of %s: associations use its own 1-ms polling",
                        installed, ", ".join(f"{v}x" for v in KNOWN_VERSIONS))
        return False
    stock = assoc.dul
    if stock.is_alive() or stock.socket is None:
        raise RuntimeError("make_prompt needs an association with its socket and not yet started")
    prompt = PromptDUL(assoc)
    assoc.dul = prompt
    # A new socket object around the same connection: it queues the acceptor's first event (Evt5,
    # "transport connection indication") on the new DUL, as the stock one did on the old.
    prompt.socket = BulkSocket(assoc, client_socket=stock.socket.socket)
    assoc.dimse = PromptDIMSE(assoc)
    # The timeouts live on the DUL's timers: set them again through the public properties.
    assoc.acse_timeout = assoc.acse_timeout
    assoc.network_timeout = assoc.network_timeout
    return True
