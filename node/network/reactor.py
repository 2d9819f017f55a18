"""Event-driven reactors (and a lean C-STORE path) for pynetdicom 3.0.x.

Why
---
pynetdicom runs two polling loops per association:

* the DUL thread (:meth:`pynetdicom.dul.DULServiceProvider.run_reactor`)
  polls the socket with ``select(..., 0)`` and calls
  ``time.sleep(_run_loop_delay)`` (1 ms) whenever a pass found nothing to do;
* the association thread
  (:meth:`pynetdicom.association.Association._run_reactor`) calls
  ``time.sleep(0.001)`` at the top of *every* pass before it looks at the
  DIMSE message queue.

With a peer that waits for each C-STORE-RSP before it sends the next request
(DCMTK ``storescu``, and pynetdicom's own ``send_c_store``) both sleeps sit
on the critical path of every message.  Once they are gone the per-instance
cost is CPU time, and profiling a 320 KB C-STORE shows three avoidable
items on the network path: reading PDUs in 4 KiB ``recv()`` calls, building
each command set twice through pydicom's generic writer (once for the group
length, once to send it), and encoding the File Meta Information through
pydicom for :meth:`~pynetdicom.events.Event.encoded_dataset`.  On the
requestor side pynetdicom leaves Nagle's algorithm on, so a C-STORE split
over several PDUs stalls on the peer's delayed ACK (~40 ms per instance).

What :func:`install` changes
----------------------------
``reactors``
    The ``time`` module seen by :mod:`pynetdicom.dul` and
    :mod:`pynetdicom.association` is replaced by a proxy whose ``sleep``
    recognises the two reactor call sites (by code object) and blocks
    instead until there is work:

    * the DUL thread waits in ``poll()``/``select()`` on its transport socket
      and on a private wake-up socket pair, written to when another thread
      queues a primitive or an event for the DUL or asks it to stop;
    * the association thread waits on a :class:`threading.Event`, set when a
      DIMSE message or ACSE primitive arrives for it, when it is asked to
      pause (``_reactor_checkpoint.clear()``) or stop (``_kill``), and when
      the DUL stops.

    Both waits are bounded by the ARTIM timer (DUL) or the network idle timer
    (association), and by :data:`MAX_IDLE_WAIT`.  The teardown polls get the
    same treatment: ``Association.kill()`` wakes on the DUL's next pass
    instead of every 10 ms, ``stop_dul()`` joins the DUL thread.  The loops
    themselves, the FSM, release, abort, rejection and TLS handling stay
    pynetdicom's own; every other ``sleep`` in those modules goes to
    :func:`time.sleep`.
    It also closes a race in pynetdicom's pause handshake that lets the
    reactor swallow the response a ``send_*()`` call is waiting for (see
    :class:`_DimseQueue`); fast round trips make it likely.
``tcp_nodelay``
    ``TCP_NODELAY`` is set on every association socket (requires
    ``reactors``).
``fast_recv``
    :meth:`pynetdicom.transport.AssociationSocket.recv` reads straight into
    one buffer with ``recv_into`` instead of 4 KiB ``recv`` calls.
``fast_command_set``
    DIMSE command sets (group 0000, Implicit VR Little Endian) are encoded
    with :mod:`struct` when every element is a plain US/UL/UI/AE/LO/AT value;
    anything else falls back to pydicom.  The bytes are identical.
``fast_file_meta``
    :meth:`pynetdicom.events.Event.encoded_dataset` builds the File Meta
    Information bytes directly (same bytes as pydicom's
    ``write_file_meta_info``), falling back to pynetdicom for anything
    unusual.

Usage::

    from node import reactor
    reactor.install()     # at start-up, before AE.start_server()/associate()

Only associations created after :func:`install` use the event-driven waits;
older ones keep polling.
"""

from __future__ import annotations

from io import BytesIO
import logging
import queue
import select
import socket
import struct
import sys
import threading
import time
import types
from typing import Any, Callable, Iterable
import warnings

__all__ = [
    "FEATURES",
    "MAX_IDLE_WAIT",
    "SUPPORTED_VERSIONS",
    "install",
    "installed_features",
    "is_installed",
    "uninstall",
]

LOGGER = logging.getLogger(__name__)

#: pynetdicom release series whose internals this module was written against
#: (``pynetdicom.__version__`` must start with one of them).
SUPPORTED_VERSIONS: tuple[str, ...] = ("3.0.",)

#: Names of the independently installable features, see :func:`install`.
FEATURES: tuple[str, ...] = (
    "reactors",
    "tcp_nodelay",
    "fast_recv",
    "fast_command_set",
    "fast_file_meta",
)

#: Upper bound (seconds) on any single idle wait.  Every state change that
#: matters is signalled, so this only limits the latency of a change made
#: behind pynetdicom's back (for instance ``acse_timeout`` altered on a live
#: association); at 0.5 s an idle association costs two wake-ups a second.
MAX_IDLE_WAIT: float = 0.5

_real_sleep = time.sleep
_HAVE_POLL = hasattr(select, "poll")
_POLLIN = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 0)

_lock = threading.Lock()
# feature name -> {what: original}, so that uninstall() can put it back.
_saved: dict[str, dict[str, Any]] = {}


# ---------------------------------------------------------------------------
# Wake-up primitives
# ---------------------------------------------------------------------------
class _DULWaker:
    """Self-pipe used to interrupt the DUL thread's ``poll()``.

    A socket pair rather than ``os.pipe()`` so that ``select()`` can wait on
    it on Windows too.  It is created when the DUL first goes idle and closed
    when its reactor returns, so an association that never starts costs no
    descriptors.
    """

    __slots__ = ("armed", "_r", "_w")

    def __init__(self) -> None:
        # Writes are only needed while the DUL is blocked; while it is busy
        # it re-checks its queues before blocking (see ``_dul_idle``), which
        # spares a syscall per queued PDU.
        self.armed = False
        self._r: socket.socket | None = None
        self._w: socket.socket | None = None

    def reader(self) -> socket.socket:
        if self._r is None:
            self._r, self._w = socket.socketpair()
            self._r.setblocking(False)
            self._w.setblocking(False)
        return self._r

    def signal(self) -> None:
        if not self.armed:
            return
        w = self._w
        if w is None:
            return
        try:
            w.send(b"\x00")
        except OSError:
            # A full buffer means a wake-up is already pending; a closed
            # socket (EBADF, never a reused descriptor) means the reactor has
            # gone.  Neither needs handling.
            pass

    def drain(self) -> None:
        r = self._r
        if r is None:
            return
        try:
            while r.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.armed = False
        r, w = self._r, self._w
        self._r = self._w = None
        for s in (r, w):
            if s is not None:
                s.close()


class _NotifyingQueue(queue.Queue):
    """:class:`queue.Queue` that runs a callback after each ``put``."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _DimseQueue(_NotifyingQueue):
    """``DIMSEServiceProvider.msg_queue`` that the reactor cannot steal from.

    ``send_c_store()`` and friends clear ``_reactor_checkpoint``, wait for
    ``_is_paused`` and then read their response with a blocking ``get``.
    But ``_is_paused`` is still ``True`` from the previous pause until the
    reactor thread runs again, so a caller can proceed while the reactor is
    about to do its non-blocking ``get`` (stock pynetdicom has this race
    too; a fast peer makes it bite: "Received unexpected C-STORE service
    message" then a DIMSE timeout).  Only the reactor loop uses a
    non-blocking ``get``, so while a pause is requested it gets nothing.
    The flag is read under the queue's mutex, which the response's ``put``
    also needs, so a response to a request sent after ``clear()`` can never
    be handed to the reactor.
    """

    def __init__(self, notify: Callable[[], None], checkpoint: threading.Event) -> None:
        super().__init__(notify)
        self._checkpoint = checkpoint

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            return super().get(block, timeout)
        with self.mutex:
            if not self._checkpoint.is_set() or not self._qsize():
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


class _Checkpoint(threading.Event):
    """``Association._reactor_checkpoint`` that wakes the reactor on ``clear``.

    ``send_c_store()`` and friends clear the checkpoint and then spin until
    the reactor reports ``_is_paused``, which it only does at the top of its
    loop, so it has to be woken out of its idle wait.
    """

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


def _signal_dul(dul: Any) -> None:
    waker = dul.__dict__.get("_evr_waker")
    if waker is not None:
        waker.signal()


def _signal_assoc(assoc: Any) -> None:
    wake = assoc.__dict__.get("_evr_wake") if assoc is not None else None
    if wake is not None:
        wake.set()


def _signal_progress(dul: Any) -> None:
    progress = dul.__dict__.get("_evr_progress")
    if progress is not None:
        progress.set()


def _timer_remaining(timer: Any) -> float | None:
    """Seconds until `timer` expires, ``None`` if it is not running.

    Mirrors :attr:`pynetdicom.timer.Timer.expired`: a timer stopped after its
    deadline reports expired for ever, so it is treated as due.
    """
    if timer.timeout is None or timer._start_time is None:
        return None
    remaining = timer.remaining
    if timer._end_time is not None and remaining >= 0:
        return None
    return max(remaining, 0.0)


# ---------------------------------------------------------------------------
# Idle waits substituted for the reactor sleeps
# ---------------------------------------------------------------------------
def _dul_idle(dul: Any, delay: float) -> None:
    """Stands in for ``time.sleep(self._run_loop_delay)`` in the DUL reactor.

    Returns when the transport socket is readable, another thread queued
    something for the DUL or asked it to stop, the ARTIM timer is due, or
    :data:`MAX_IDLE_WAIT` elapsed.
    """
    waker = dul.__dict__.get("_evr_waker")
    if waker is None:
        _real_sleep(delay)
        return
    assoc = dul.__dict__.get("_assoc")
    if assoc is not None and assoc.__dict__.get("_kill"):
        # Association.kill() is polling for this DUL to reach Sta1; every
        # state change is followed by a pass that ends up here (or by the
        # thread's end, see ``dul_run_reactor``).
        _signal_progress(dul)

    timeout = MAX_IDLE_WAIT
    artim = _timer_remaining(dul.artim_timer)
    if artim is not None:
        timeout = min(timeout, artim)
    # Sta13 (awaiting close) ends on the first pass that finds no data; never
    # hold it up longer than the stock delay.
    if dul.state_machine.current_state == "Sta13":
        timeout = min(timeout, delay)

    asock = dul.socket
    sock = None
    if asock is not None and asock._is_connected:
        sock = asock.socket
        # Records already decrypted into the SSL buffer leave the kernel
        # socket unreadable; the stock ``ready`` covers them with
        # ``pending()`` and so must we.
        pending = getattr(sock, "pending", None)
        if pending is not None:
            try:
                if pending():
                    return
            except (OSError, ValueError):
                return

    try:
        rfd = waker.reader()
    except OSError:
        _real_sleep(delay)
        return

    waker.armed = True
    try:
        # Re-check after arming: a producer that ran before ``armed`` was set
        # skipped its wake-up write, so its item must be seen here.
        if (
            dul._kill_thread
            or dul.to_provider_queue.qsize()
            or dul.event_queue.qsize()
            or timeout <= 0
        ):
            return
        fds = [rfd] if sock is None else [rfd, sock]
        try:
            if _HAVE_POLL:
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, _POLLIN)
                poller.poll(timeout * 1000.0)
            else:
                select.select(fds, [], [], timeout)
        except (OSError, ValueError):
            # The socket was closed under us (e.g. ``abort()`` from another
            # thread); the loop's own ``ready`` check turns that into Evt17.
            return
    finally:
        waker.armed = False
    waker.drain()


def _assoc_idle(assoc: Any, delay: float) -> None:
    """Stands in for ``time.sleep(0.001)`` in ``Association._run_reactor``.

    Returns when a DIMSE message or ACSE primitive arrives, the reactor is
    asked to pause or stop, the DUL stops, the network idle timer is due, or
    :data:`MAX_IDLE_WAIT` elapsed.
    """
    wake = assoc.__dict__.get("_evr_wake")
    if wake is None:
        _real_sleep(delay)
        return

    dul = assoc.dul
    timeout = MAX_IDLE_WAIT
    idle = _timer_remaining(dul._idle_timer)
    if idle is not None:
        # Land just past the deadline so a single pass sees it expired.
        timeout = min(timeout, idle + 0.001)

    if dul._kill_thread and dul.is_alive():
        # The loop is about to check ``dul.is_alive()``; waiting for the
        # thread to finish is the useful thing to do with this slot.
        dul.join(timeout)
        return

    wake.wait(timeout)
    # Auto-reset before the loop body looks at the queues: anything queued
    # from here on sets the event again, so no wake-up is lost.
    wake.clear()


def _kill_wait(assoc: Any, delay: float) -> None:
    """Stands in for ``time.sleep(0.01)`` in ``Association.kill``.

    ``kill()`` loops until the DUL thread has ended or ``dul.stop_dul()``
    finds the FSM in Sta1; the DUL usually gets there a fraction of a
    millisecond after the release or abort that prompted the kill, so wake
    on its next idle pass, its stop request or its end instead of sleeping a
    fixed 10 ms.
    """
    progress = assoc.dul.__dict__.get("_evr_progress")
    if progress is None:
        _real_sleep(delay)
        return
    progress.wait(delay)
    progress.clear()


def _stop_wait(dul: Any, delay: float) -> None:
    """Stands in for ``time.sleep(self._run_loop_delay)`` in ``stop_dul``,
    which waits for the DUL thread to end: join it instead."""
    if dul.is_alive() and threading.current_thread() is not dul:
        dul.join(delay)
    else:
        _real_sleep(delay)


class _TimeProxy(types.ModuleType):
    """Stand-in for the ``time`` module inside one pynetdicom module.

    ``sleep`` calls made from the code objects in `hooks` are routed to the
    matching idle wait with the caller's ``self``; everything else goes to
    the real :mod:`time`.
    """

    def __init__(self, hooks: dict[types.CodeType, Callable[[Any, float], None]]):
        super().__init__("time")
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, secs: float) -> None:
        frame = sys._getframe(1)
        hook = self._hooks.get(frame.f_code)
        if hook is not None:
            owner = frame.f_locals.get("self")
            del frame
            if owner is not None:
                hook(owner, secs)
                return
        _real_sleep(secs)


def _flag_property(name: str, on_true: Callable[[Any], None]) -> property:
    """Data descriptor for a boolean flag that calls `on_true` when set.

    The value lives in the instance ``__dict__`` under the same name, so the
    objects keep working unchanged after :func:`uninstall` drops the
    descriptor.
    """

    def getter(self: Any) -> Any:
        return self.__dict__.get(name, False)

    def setter(self: Any, value: Any) -> None:
        self.__dict__[name] = value
        if value:
            on_true(self)

    return property(getter, setter, doc=f"``{name}`` (wakes the reactor when set)")


def _on_dul_kill(dul: Any) -> None:
    waker = dul.__dict__.get("_evr_waker")
    if waker is not None:
        waker.signal()
    _signal_progress(dul)
    # The association reactor joins a stopping DUL (see ``_assoc_idle``).
    _signal_assoc(dul.__dict__.get("_assoc"))


def _install_reactors() -> dict[str, Any]:
    from pynetdicom import association as _association
    from pynetdicom import dul as _dul

    DUL = _dul.DULServiceProvider
    Assoc = _association.Association
    orig_dul_init = DUL.__init__
    orig_dul_run = DUL.run_reactor
    orig_assoc_init = Assoc.__init__

    def dul_init(self: Any, assoc: Any) -> None:
        orig_dul_init(self, assoc)
        self._evr_waker = _DULWaker()
        self._evr_progress = threading.Event()
        notify_dul = lambda: _signal_dul(self)  # noqa: E731
        # Swapped before anything (e.g. AssociationSocket's Evt5) is queued,
        # so no item can be lost.
        self.event_queue = _NotifyingQueue(notify_dul)
        self.to_provider_queue = _NotifyingQueue(notify_dul)
        self.to_user_queue = _NotifyingQueue(
            lambda: _signal_assoc(self.__dict__.get("_assoc"))
        )

    def dul_run_reactor(self: Any) -> None:
        try:
            orig_dul_run(self)
        finally:
            waker = self.__dict__.get("_evr_waker")
            if waker is not None:
                waker.close()
            _signal_progress(self)
            _signal_assoc(self.__dict__.get("_assoc"))

    def assoc_init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_assoc_init(self, *args, **kwargs)
        wake = threading.Event()
        wake.set()
        self._evr_wake = wake
        checkpoint = _Checkpoint(wake)
        if self._reactor_checkpoint.is_set():
            checkpoint.set()
        self._reactor_checkpoint = checkpoint
        self.dimse.msg_queue = _DimseQueue(wake.set, checkpoint)

    for wrapper, orig in (
        (dul_init, orig_dul_init),
        (dul_run_reactor, orig_dul_run),
        (assoc_init, orig_assoc_init),
    ):
        wrapper.__doc__ = orig.__doc__
        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]

    saved = {
        "dul_time": _dul.time,
        "assoc_time": _association.time,
        "dul_init": orig_dul_init,
        "dul_run": orig_dul_run,
        "assoc_init": orig_assoc_init,
    }
    _dul.time = _TimeProxy(
        {orig_dul_run.__code__: _dul_idle, DUL.stop_dul.__code__: _stop_wait}
    )
    _association.time = _TimeProxy(
        {Assoc._run_reactor.__code__: _assoc_idle, Assoc.kill.__code__: _kill_wait}
    )
    DUL.__init__ = dul_init
    DUL.run_reactor = dul_run_reactor
    DUL._kill_thread = _flag_property("_kill_thread", _on_dul_kill)
    Assoc.__init__ = assoc_init
    Assoc._kill = _flag_property("_kill", _signal_assoc)
    return saved


def _uninstall_reactors(saved: dict[str, Any]) -> None:
    from pynetdicom import association as _association
    from pynetdicom import dul as _dul

    _dul.time = saved["dul_time"]
    _association.time = saved["assoc_time"]
    _dul.DULServiceProvider.__init__ = saved["dul_init"]
    _dul.DULServiceProvider.run_reactor = saved["dul_run"]
    del _dul.DULServiceProvider._kill_thread
    _association.Association.__init__ = saved["assoc_init"]
    del _association.Association._kill


# ---------------------------------------------------------------------------
# tcp_nodelay
# ---------------------------------------------------------------------------
def _set_nodelay(sock: Any) -> None:
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _install_tcp_nodelay() -> dict[str, Any]:
    from pynetdicom import transport

    orig = transport.AssociationSocket.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        # A DIMSE message goes out as several PDUs, one send() each; with
        # Nagle on, the last short one waits for the ACK of the previous
        # ones, which the peer delays (40 ms on Linux) - the same stall as
        # DCMTK without TCP_NODELAY=1.
        _set_nodelay(self.socket)

    init.__doc__ = orig.__doc__
    init.__wrapped__ = orig  # type: ignore[attr-defined]
    transport.AssociationSocket.__init__ = init
    return {"init": orig}


def _uninstall_tcp_nodelay(saved: dict[str, Any]) -> None:
    from pynetdicom import transport

    transport.AssociationSocket.__init__ = saved["init"]


# ---------------------------------------------------------------------------
# fast_recv
# ---------------------------------------------------------------------------
#: Initial receive buffer cap: the buffer only grows beyond this as data
#: actually arrives, so a peer announcing a huge PDU length cannot make us
#: allocate it up front (the stock 4 KiB loop has the same property).
_RECV_PREALLOC = 4 * 1024 * 1024


def _socket_recv(self: Any, nr_bytes: int) -> bytearray:
    """Replacement for ``AssociationSocket.recv``: same contract (up to
    `nr_bytes` as a :class:`bytearray`, short only if the peer closed, errors
    propagate), but one ``recv_into`` per kernel read instead of 4 KiB reads.
    """
    sock = self.socket
    buf = bytearray(min(nr_bytes, _RECV_PREALLOC))
    got = 0
    while got < nr_bytes:
        if got == len(buf):
            buf.extend(bytes(min(len(buf), nr_bytes - got)))
        with memoryview(buf) as view:
            n = sock.recv_into(view[got:])
        if not n:
            break
        got += n
    del buf[got:]
    return buf


def _install_fast_recv() -> dict[str, Any]:
    from pynetdicom import transport

    orig = transport.AssociationSocket.recv
    _socket_recv.__wrapped__ = orig  # type: ignore[attr-defined]
    transport.AssociationSocket.recv = _socket_recv
    return {"recv": orig}


def _uninstall_fast_recv(saved: dict[str, Any]) -> None:
    from pynetdicom import transport

    transport.AssociationSocket.recv = saved["recv"]


# ---------------------------------------------------------------------------
# fast_command_set
# ---------------------------------------------------------------------------
_pack = struct.pack
_STR_PAD = {"UI": "\0", "AE": " ", "LO": " "}
_INT_FMT = {"US": ("<H", 0xFFFF), "UL": ("<I", 0xFFFFFFFF)}


def _ints(value: Any, limit: int) -> list[int] | None:
    if isinstance(value, (str, bytes, bytearray)):
        # pydicom would refuse these; iterating them must not look valid.
        return None
    vals = [value] if isinstance(value, int) else value
    try:
        if all(isinstance(v, int) and 0 <= v <= limit for v in vals):
            return list(vals)
    except TypeError:
        pass
    return None


def _encode_command_set(ds: Any) -> bytes | None:
    """Implicit VR Little Endian encoding of a DIMSE command set, or ``None``.

    Mirrors what pydicom's ``write_dataset`` produces for group 0000 (tags in
    ascending order, 4-byte lengths, UI padded with NUL, AE/LO with space,
    empty values written with length 0).  Returns ``None`` for anything it
    does not cover so the caller can use pydicom.
    """
    parts: list[bytes] = []
    for elem in ds:
        tag = elem.tag
        if tag > 0xFFFF:
            return None
        vr = elem.VR
        value = elem.value
        if value is None or (isinstance(value, (str, list, tuple)) and not value):
            data = b""
        elif vr in _INT_FMT:
            fmt, limit = _INT_FMT[vr]
            ints = _ints(value, limit)
            if ints is None:
                return None
            data = b"".join([_pack(fmt, v) for v in ints])
        elif vr in _STR_PAD:
            if isinstance(value, str):
                text = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                text = "\\".join(value)
            else:
                return None
            if not text.isascii():
                return None
            if len(text) % 2:
                text += _STR_PAD[vr]
            data = text.encode("ascii")
        elif vr == "AT":
            tags = _ints(value, 0xFFFFFFFF)
            if tags is None:
                return None
            data = b"".join([_pack("<HH", t >> 16, t & 0xFFFF) for t in tags])
        else:
            return None
        parts.append(_pack("<HHI", 0, tag, len(data)))
        parts.append(data)
    return b"".join(parts)


def _install_fast_command_set() -> dict[str, Any]:
    from pynetdicom import dimse_messages

    orig = dimse_messages.encode

    def encode(
        ds: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
    ) -> bytes | None:
        if is_implicit_vr and is_little_endian and not deflated:
            fast = _encode_command_set(ds)
            if fast is not None:
                return fast
        return orig(ds, is_implicit_vr, is_little_endian, deflated)

    encode.__doc__ = orig.__doc__
    encode.__wrapped__ = orig  # type: ignore[attr-defined]
    dimse_messages.encode = encode
    return {"encode": orig}


def _uninstall_fast_command_set(saved: dict[str, Any]) -> None:
    from pynetdicom import dimse_messages

    dimse_messages.encode = saved["encode"]


# ---------------------------------------------------------------------------
# fast_file_meta
# ---------------------------------------------------------------------------
_PREAMBLE = b"\x00" * 128 + b"DICM"
# (0002,0001) File Meta Information Version, OB, 00\01
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _meta_str(value: Any, pad: str, required: bool) -> bytes | None:
    if value is None:
        return None if required else b""
    if not isinstance(value, str) or "\\" in value or not value.isascii():
        return None
    # pydicom stores UI values via UID(), which strips surrounding blanks.
    text = value.strip() if pad == "\0" else value
    if required and not text:
        return None
    if len(text) % 2:
        text += pad
    if len(text) > 0xFFFF:
        return None
    return text.encode("ascii")


def _file_meta_bytes(
    sop_class: Any, sop_instance: Any, transfer_syntax: Any, impl_uid: Any, impl_version: Any
) -> bytes | None:
    """Explicit VR Little Endian File Meta Information, or ``None``.

    Produces what ``pydicom.filewriter.write_file_meta_info`` writes for
    :func:`pynetdicom.dsutils.create_file_meta`; ``None`` asks the caller to
    use pynetdicom (which raises for missing Type 1 values).
    """
    fields = (
        (b"\x02\x00\x02\x00UI", _meta_str(sop_class, "\0", True)),
        (b"\x02\x00\x03\x00UI", _meta_str(sop_instance, "\0", True)),
        (b"\x02\x00\x10\x00UI", _meta_str(transfer_syntax, "\0", True)),
        (b"\x02\x00\x12\x00UI", _meta_str(impl_uid, "\0", False)),
        (b"\x02\x00\x13\x00SH", _meta_str(impl_version, " ", False)),
    )
    parts = [_META_VERSION]
    for head, value in fields:
        if value is None:
            return None
        parts.append(head)
        parts.append(_pack("<H", len(value)))
        parts.append(value)
    body = b"".join(parts)
    return b"\x02\x00\x00\x00UL\x04\x00" + _pack("<I", len(body)) + body


def _install_fast_file_meta() -> dict[str, Any]:
    from pynetdicom import events

    orig = events.Event.encoded_dataset
    create_file_meta = events.create_file_meta

    def encoded_dataset(self: Any, include_meta: bool = True) -> bytes:
        if include_meta:
            try:
                request = self.request
                stream = request.DataSet
                defaults = create_file_meta.__kwdefaults__ or {}
                meta = _file_meta_bytes(
                    request.AffectedSOPClassUID,
                    request.AffectedSOPInstanceUID,
                    self.context.transfer_syntax,
                    defaults.get("implementation_uid"),
                    defaults.get("implementation_version"),
                )
            except AttributeError:
                meta = stream = None
            if meta is not None and isinstance(stream, BytesIO):
                return b"".join((_PREAMBLE, meta, stream.getvalue()))
        return orig(self, include_meta)

    encoded_dataset.__doc__ = orig.__doc__
    encoded_dataset.__wrapped__ = orig  # type: ignore[attr-defined]
    events.Event.encoded_dataset = encoded_dataset
    return {"encoded_dataset": orig}


def _uninstall_fast_file_meta(saved: dict[str, Any]) -> None:
    from pynetdicom import events

    events.Event.encoded_dataset = saved["encoded_dataset"]


_INSTALLERS: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = {
    "reactors": (_install_reactors, _uninstall_reactors),
    "tcp_nodelay": (_install_tcp_nodelay, _uninstall_tcp_nodelay),
    "fast_recv": (_install_fast_recv, _uninstall_fast_recv),
    "fast_command_set": (_install_fast_command_set, _uninstall_fast_command_set),
    "fast_file_meta": (_install_fast_file_meta, _uninstall_fast_file_meta),
}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def _compatibility_problem(features: Iterable[str]) -> str | None:
    """Describe why the installed pynetdicom cannot be patched, else ``None``."""
    import pynetdicom
    from pynetdicom import association, dimse_messages, dul, events, transport

    version = getattr(pynetdicom, "__version__", "?")
    if not any(version.startswith(v) for v in SUPPORTED_VERSIONS):
        return f"pynetdicom {version} is not supported (need {' or '.join(SUPPORTED_VERSIONS)}x)"
    checks = {
        "reactors": (
            dul.time is time
            and association.time is time
            and "sleep" in dul.DULServiceProvider.run_reactor.__code__.co_names
            and "sleep" in association.Association._run_reactor.__code__.co_names
            and "sleep" in association.Association.kill.__code__.co_names
            and "sleep" in dul.DULServiceProvider.stop_dul.__code__.co_names
            # the flags must still be plain instance attributes
            and "_kill_thread" not in vars(dul.DULServiceProvider)
            and "_kill" not in vars(association.Association)
        ),
        "tcp_nodelay": hasattr(socket, "TCP_NODELAY"),
        "fast_recv": callable(getattr(transport.AssociationSocket, "recv", None)),
        "fast_command_set": callable(getattr(dimse_messages, "encode", None)),
        "fast_file_meta": callable(getattr(events.Event, "encoded_dataset", None))
        and callable(getattr(events, "create_file_meta", None)),
    }
    bad = [f for f in features if not checks[f]]
    if bad:
        return f"pynetdicom {version} internals differ from what {', '.join(bad)} expects"
    return None


def install(
    *,
    strict: bool = False,
    reactors: bool = True,
    tcp_nodelay: bool = True,
    fast_recv: bool = True,
    fast_command_set: bool = True,
    fast_file_meta: bool = True,
) -> bool:
    """Make pynetdicom's reactors event-driven and its C-STORE path leaner.

    Idempotent and thread-safe; features already installed are left as they
    are (call :func:`uninstall` first to change the selection).  Call it at
    start-up, before associations are created: existing associations keep
    polling.

    Parameters
    ----------
    strict : bool, optional
        If ``True``, raise :class:`RuntimeError` when the installed
        pynetdicom is not a supported version or its internals are not as
        expected.  If ``False`` (default), issue a :class:`RuntimeWarning`
        and leave pynetdicom in its stock state.
    reactors : bool, optional
        Replace the 1 ms polling sleeps of the DUL and association reactors
        with blocking waits (default ``True``).
    tcp_nodelay : bool, optional
        Disable Nagle's algorithm on association sockets (default ``True``).
        Requires `reactors`, which brings the guard against pynetdicom's
        pause race that prompt responses expose.
    fast_recv : bool, optional
        Read PDUs with ``recv_into`` instead of 4 KiB ``recv`` calls
        (default ``True``).
    fast_command_set : bool, optional
        Encode DIMSE command sets without pydicom when possible (default
        ``True``).
    fast_file_meta : bool, optional
        Build the File Meta Information of
        :meth:`~pynetdicom.events.Event.encoded_dataset` without pydicom
        when possible (default ``True``).

    Returns
    -------
    bool
        ``True`` if the requested features are active, ``False`` if
        pynetdicom was left unpatched.

    Raises
    ------
    RuntimeError
        With `strict`, when pynetdicom is unsupported.
    ValueError
        If `tcp_nodelay` is requested without `reactors`.
    """
    wanted = [
        name
        for name, on in zip(
            FEATURES, (reactors, tcp_nodelay, fast_recv, fast_command_set, fast_file_meta)
        )
        if on
    ]
    if tcp_nodelay and not reactors and "reactors" not in _saved:
        # Prompt responses make pynetdicom's own pause race (see _DimseQueue)
        # likely; the guard against it comes with the reactors.
        raise ValueError("tcp_nodelay=True requires reactors=True")
    with _lock:
        todo = [f for f in wanted if f not in _saved]
        if not todo:
            return True
        problem = _compatibility_problem(todo)
        if problem is not None:
            msg = f"node.reactor: {problem}; keeping pynetdicom's stock behaviour"
            if strict:
                raise RuntimeError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return False
        for name in todo:
            _saved[name] = _INSTALLERS[name][0]()
        LOGGER.debug("node.reactor: installed %s", ", ".join(todo))
        return True


def uninstall() -> None:
    """Restore pynetdicom's stock behaviour for every installed feature.

    Associations created while installed keep their notifying queues, which
    still work with the stock loops; their idle waits revert to plain sleeps.
    """
    with _lock:
        for name in reversed(FEATURES):
            saved = _saved.pop(name, None)
            if saved is not None:
                _INSTALLERS[name][1](saved)


def is_installed() -> bool:
    """Return ``True`` if any feature of :func:`install` is in effect."""
    return bool(_saved)


def installed_features() -> frozenset[str]:
    """Return the names (from :data:`FEATURES`) of the installed features."""
    return frozenset(_saved)
