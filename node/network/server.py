"""The SCP's listening server: every new connection gets a deadline, and none holds the door.

pynetdicom's stock server, as measured here, lets a connection that never completes its
A-ASSOCIATE-RQ hold an association slot, and one that sends part of a PDU hold it for ever (the
socket has no timeout, so the DUL thread blocks in ``recv``); on the TLS port it runs the
handshake in the accepting thread without a timeout, so one silent connection stops every TLS
association. This module changes that through pynetdicom's public extension points only
(:meth:`pynetdicom.ae.ApplicationEntity.make_server` with ``server_class`` and
``request_handler``, a subclass of :class:`pynetdicom.transport.ThreadedAssociationServer` and of
:class:`pynetdicom.transport.RequestHandler`, and an ``EVT_REQUESTED`` handler), for the node's own
listening ports only; the export SCU is untouched:

- the accepting thread only accepts: a TLS socket is wrapped without its handshake, which runs
  in the connection's own thread with a timeout;
- until the whole A-ASSOCIATE-RQ has arrived a connection's socket times out after
  ``limits.request_seconds`` (a partial PDU ends in ``recv`` timing out, nothing at all in
  pynetdicom's ARTIM timer, set to the same), and after it after ``limits.idle_seconds``;
- connections still waiting for their request are counted apart from associations, at most
  :func:`pending_limit` of them; a new one beyond that closes the oldest waiting one, so that a
  flood of idle connections cannot shut out a peer that sends its request at once.

Each accepted association also waits for its socket and its queues instead of polling them every
millisecond (:mod:`node.network.prompt_reactor`).

Association slots (how many at once, per peer) are the SCP's business: :mod:`node.network.scp`
admits or rejects each request.

On a pynetdicom release outside :data:`KNOWN_VERSIONS`, :func:`start` logs a warning and runs
pynetdicom's stock server instead: the node still works, without these protections.
"""

from __future__ import annotations

import collections
import logging
import socket
import socketserver
import ssl
import threading
from typing import Any

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from .prompt_reactor import make_prompt

__all__ = ["KNOWN_VERSIONS", "GuardedServer", "pending_limit", "start"]

log = logging.getLogger(__name__)

#: pynetdicom release series whose server classes this module was written and tested against.
KNOWN_VERSIONS: tuple[str, ...] = ("3.0.",)


def pending_limit(associations: int) -> int:
    """How many connections may wait for their A-ASSOCIATE-RQ at once: twice the association
    limit, at least 16 (a peer that sends its request at once waits milliseconds)."""
    return max(16, 2 * associations)


class _Handler(RequestHandler):
    """pynetdicom's request handler, run in the connection's own thread, with the TLS handshake
    (bounded by the server's request timeout) done first."""

    server: "GuardedServer"

    def handle(self) -> None:
        sock = self.request
        try:
            sock.settimeout(self.server.request_seconds)
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            log.debug("connection from %s closed before its association request: %s",
                      self.client_address[0], "timed out" if isinstance(exc, TimeoutError) else exc)
            self.server.forget(sock)
            self.server.shutdown_request(sock)
            return
        super().handle()


class GuardedServer(ThreadedAssociationServer):
    """A threaded association server with deadlines for new connections (see the module).

    Parameters
    ----------
    *args
        As for :class:`pynetdicom.transport.AssociationServer`.
    request_seconds : float
        Time a connection has for its TLS handshake and A-ASSOCIATE-RQ.
    idle_seconds : float
        Socket timeout once the request has arrived.
    max_pending : int
        Connections waiting for their request at most; a new one closes the oldest.
    **kwargs
        As for :class:`pynetdicom.transport.AssociationServer`.
    """

    # Threads serve single connections; stopping the server must not wait for them to end.
    daemon_threads = True
    block_on_close = False
    # A burst of connections must find room in the listen queue while the acceptor works.
    request_queue_size = 128

    def __init__(self, *args: Any, request_seconds: float, idle_seconds: float, max_pending: int,
                 prompt: bool = True, **kwargs: Any) -> None:
        self.request_seconds = request_seconds
        self.prompt = prompt
        self.idle_seconds = idle_seconds
        self.max_pending = max_pending
        # Sockets accepted whose A-ASSOCIATE-RQ has not arrived, oldest first.
        self._pending: collections.OrderedDict[int, socket.socket] = collections.OrderedDict()
        self._sockets: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._evicted = 0
        super().__init__(*args, request_handler=_Handler, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_open)
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_CONN_CLOSE, self._on_close)

    # -- the accepting thread ------------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, and wrap a TLS socket without shaking hands (that is the handler's job)."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Count the connection as waiting; close the oldest waiting one when there are too many."""
        evicted = None
        with self._lock:
            self._pending[id(request)] = request
            if len(self._pending) > self.max_pending:
                _, evicted = self._pending.popitem(last=False)
                self._evicted += 1
        if evicted is not None:
            if self._evicted % 100 == 1:  # a flood must not flood the log as well
                log.warning("more than %d connections waiting for an association request: closing the oldest"
                            " (%d so far)", self.max_pending, self._evicted)
            _shut(evicted)
        return True

    # -- connection threads --------------------------------------------------------------------

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._pending.pop(id(sock), None)

    def _on_open(self, event: evt.Event) -> None:
        # Runs in the handler's thread, before the association's own thread starts.
        if self.prompt:
            make_prompt(event.assoc)
        sock = event.assoc.dul.socket.socket
        with self._lock:
            self._sockets[id(event.assoc)] = sock

    def _on_requested(self, event: evt.Event) -> None:
        with self._lock:
            sock = self._sockets.get(id(event.assoc))
            if sock is not None:
                self._pending.pop(id(sock), None)
        if sock is not None:
            try:
                sock.settimeout(self.idle_seconds)
            except OSError:
                pass  # closed meanwhile: the association ends on its own

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            sock = self._sockets.pop(id(event.assoc), None)
            if sock is not None:
                self._pending.pop(id(sock), None)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (open associations run to their end)."""
        # AssociationServer.shutdown() would also remove the server from the list of servers that
        # AE.start_server() keeps; this one was made by AE.make_server() and is not on it.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _shut(sock: socket.socket) -> None:
    """Make a connection's blocked reads return, so that its threads end and it is closed."""
    try:
        # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown() would drop its
        # TLS state under a handshake running in another thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def start(ae: AE, address: tuple[str, int], handlers: list, *, request_seconds: float, idle_seconds: float,
          max_pending: int, ssl_context: ssl.SSLContext | None = None, prompt: bool = True) -> Any:
    """Listen on ``address`` in a background thread; return the server (``.shutdown()`` stops it).

    The guarded server on a known pynetdicom release, pynetdicom's stock one otherwise. With
    ``prompt`` its associations wait for their socket and queues instead of polling them
    (:mod:`node.network.prompt_reactor`).
    """
    version = getattr(pynetdicom, "__version__", "?")
    if not version.startswith(KNOWN_VERSIONS):
        log.warning("pynetdicom %s is not a release this node knows (%s): listening with pynetdicom's stock"
                    " server, without deadlines for new connections or the TLS handshake",
                    version, ", ".join(v + "x" for v in KNOWN_VERSIONS))
        return ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=ssl_context)
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context, server_class=GuardedServer,
                            request_seconds=request_seconds, idle_seconds=idle_seconds, max_pending=max_pending,
                            prompt=prompt)
    thread = threading.Thread(target=server.serve_forever, name=f"DICOM server {address[1]}", daemon=True)
    thread.start()
    return server
