"""Who may see and do what on the dashboard: passwords, the proxy header, sessions, CSRF tokens.

Rules:

- every page needs a session; a session comes from a password login (argon2 hashes in the
  configuration) or from the SSO reverse proxy's header, believed only when the request comes
  from one of ``dashboard.trusted_proxies``;
- roles: ``viewer`` reads; ``operator`` also retries jobs and deliveries and resends results;
- every action (a POST) carries the session's CSRF token;
- a session ends ``session_minutes`` after the last page or action the person asked for (live
  updates do not keep it alive) and ``session_hours`` after the login in any case; sessions live
  in the node's memory, so a restart logs everyone out;
- failed logins from one address are limited (5 in 15 minutes).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import argon2

from ..config import DashboardSettings, DashboardUser

__all__ = [
    "PERMISSIONS", "Authenticator", "LoginThrottle", "Session", "Sessions", "allowed", "hash_password",
    "safe_next", "token_matches", "trusted_proxy",
]

#: What each role may do. ``read``: every page; ``retry``: run a job again, try deliveries now;
#: ``resend``: queue a job's results for a destination again.
PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "retry", "resend"}),
}

_HASHER = argon2.PasswordHasher()
#: Verified against when the user name is unknown, so that an unknown name takes as long as a
#: wrong password and the answer does not tell which names exist.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def allowed(role: str, permission: str) -> bool:
    """Whether ``role`` has ``permission``; unknown roles have none."""
    return permission in PERMISSIONS.get(role, frozenset())


def hash_password(password: str) -> str:
    """An argon2id hash with argon2-cffi's default parameters (RFC 9106's low-memory profile)."""
    if not password:
        raise ValueError("the password is empty")
    return _HASHER.hash(password)


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a secret token with what a request carried."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


def trusted_proxy(address: str | None, networks: tuple[str, ...]) -> bool:
    """Whether a peer address lies in one of the trusted proxy networks."""
    if not address:
        return False
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(peer in ipaddress.ip_network(n, strict=False) for n in networks)


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path on this site, never another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path or path.startswith("/login"):
        return "/"
    return path


class Authenticator:
    """Checks passwords and the proxy header against the configured users."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings

    def check_password(self, name: str, password: str) -> DashboardUser | None:
        """The user, if ``password`` matches their hash; ``None`` otherwise (also for unknown names)."""
        user = self.settings.user(name)
        hashed = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
        try:
            _HASHER.verify(hashed, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return None
        return user if hashed is not _DUMMY_HASH else None

    def from_proxy(self, address: str | None, headers: Mapping[str, str]) -> DashboardUser | None:
        """The user named by the proxy header, if the request came from a trusted proxy and the
        name is a configured user."""
        if not self.settings.proxy_header or not trusted_proxy(address, self.settings.trusted_proxies):
            return None
        name = headers.get(self.settings.proxy_header, "").strip()
        return self.settings.user(name) if name else None


@dataclass
class Session:
    """A logged-in person. ``id`` is the cookie's value; ``csrf`` goes into every form."""

    id: str
    user: str
    role: str
    via: str
    created: float
    last_seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    messages: list[str] = field(default_factory=list)


class Sessions:
    """Sessions in memory, with idle and absolute time-outs.

    Parameters
    ----------
    idle_seconds, max_seconds : float
        A session ends this long after its last use, and this long after it began.
    clock : callable
        Seconds; ``time.monotonic`` unless a test gives another.
    """

    def __init__(self, idle_seconds: float, max_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: DashboardUser, via: str) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), user.name, user.role, via, now, now)
        with self._lock:
            self._expire(now)
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None, touch: bool = True) -> Session | None:
        """The live session of a cookie value, or ``None``. ``touch`` counts this as use."""
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is not None and touch:
                session.last_seen = now
            return session

    def end(self, session_id: str | None) -> Session | None:
        with self._lock:
            return self._sessions.pop(session_id or "", None)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items()
                    if now - s.last_seen > self.idle_seconds or now - s.created > self.max_seconds]:
            del self._sessions[key]


class LoginThrottle:
    """At most ``limit`` failed logins per address within ``window`` seconds."""

    def __init__(self, limit: int = 5, window: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(address, deque())
        while failures and now - failures[0] > self.window:
            failures.popleft()
        return failures

    def allowed(self, address: str) -> bool:
        with self._lock:
            return len(self._recent(address, self.clock())) < self.limit

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            self._recent(address, now).append(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
