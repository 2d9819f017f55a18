"""The dashboard's settings: the ``[dashboard]`` table of the configuration file.

::

    [dashboard]
    host = "127.0.0.1"           # MUSCLENODE_DASHBOARD_HOST
    port = 8090                  # MUSCLENODE_DASHBOARD_PORT; 0 turns the dashboard off
    session_minutes = 30         # a session ends after this long without a page or action
    session_hours = 12           # and this long after the login in any case
    proxy_header = ""            # e.g. "X-Remote-User": the user name set by an SSO reverse proxy
    trusted_proxies = []         # addresses or networks the proxy header is believed from

    [[dashboard.users]]
    name = "it-staff"
    role = "operator"            # viewer: read; operator: also retry and resend
    password_hash = "$argon2id$..."   # from `musclenode dashboard hash-password`

The dashboard starts only when its port is not 0 and someone can log in (a user with a password
hash, or a proxy header).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any, Literal, Mapping

import argon2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import ConfigError

__all__ = ["DashboardSettings", "DashboardUser", "ENVIRONMENT", "ROLES", "load_dashboard_settings"]

#: Roles and what they may do; see :mod:`node.dashboard.access`.
ROLES = ("viewer", "operator")

#: Environment variables and the dashboard setting each overrides.
ENVIRONMENT = {"MUSCLENODE_DASHBOARD_PORT": "port", "MUSCLENODE_DASHBOARD_HOST": "host"}


class DashboardUser(BaseModel):
    """A person who may log in to the dashboard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    role: Literal["viewer", "operator"]
    #: An argon2 hash (``musclenode dashboard hash-password``); empty: this user logs in only
    #: through the reverse proxy's header.
    password_hash: str = ""

    @field_validator("password_hash")
    @classmethod
    def _argon2_hash(cls, value: str) -> str:
        if value:
            try:
                argon2.extract_parameters(value)
            except argon2.exceptions.InvalidHashError:
                raise ValueError("must be an argon2 hash made by `musclenode dashboard hash-password`") from None
        return value


class DashboardSettings(BaseModel):
    """Where the dashboard listens, who may log in and how long a session lasts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    session_minutes: float = Field(30.0, gt=0, le=24 * 60)
    session_hours: float = Field(12.0, gt=0, le=7 * 24)
    proxy_header: str = Field("", pattern=r"^[A-Za-z0-9-]{0,64}$")
    trusted_proxies: tuple[str, ...] = ()
    users: tuple[DashboardUser, ...] = ()

    @field_validator("host")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value.strip())
        except ValueError:
            raise ValueError("must be an IP address to listen on, such as 127.0.0.1") from None
        return value.strip()

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DashboardSettings":
        names = [u.name for u in self.users]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"users: the name {twice[0]!r} is used twice")
        if self.proxy_header and not self.trusted_proxies:
            raise ValueError("proxy_header needs trusted_proxies: the addresses of the reverse proxy")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the dashboard runs: a port, and a way to log in."""
        return self.port != 0 and (bool(self.proxy_header) or any(u.password_hash for u in self.users))

    def user(self, name: str) -> DashboardUser | None:
        return next((u for u in self.users if u.name == name), None)


def _where(location: tuple[Any, ...]) -> str:
    """``("users", 0, "role")`` -> ``dashboard.users[1].role`` (tables counted from 1, as elsewhere)."""
    text = "dashboard"
    for part in location:
        text += f"[{part + 1}]" if isinstance(part, int) else f".{part}"
    return text


def load_dashboard_settings(path: str | os.PathLike[str] | None = None,
                            environ: Mapping[str, str] | None = None) -> DashboardSettings:
    """The dashboard's settings from the configuration file's ``[dashboard]`` table and the environment.

    Parameters
    ----------
    path : path-like, optional
        The TOML file; without one, ``MUSCLENODE_CONFIG`` names it; without that, the defaults.
    environ : mapping, optional
        ``os.environ`` by default.

    Raises
    ------
    ConfigError
        A setting is unknown or invalid; the message names it and where its value came from.
    """
    environ = os.environ if environ is None else environ
    path = path if path is not None else environ.get("MUSCLENODE_CONFIG") or None
    table: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"configuration file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path}: not valid TOML: {exc}") from None
        found = document.get("dashboard", {})
        if not isinstance(found, dict):
            raise ConfigError(f"dashboard: must be a table ([dashboard]) (from {path})")
        table = dict(found)
        sources = {key: str(path) for key in table}
    for variable, key in ENVIRONMENT.items():
        if variable in environ:
            table[key] = environ[variable]
            sources[key] = f"environment variable {variable}"
    try:
        return DashboardSettings.model_validate(table)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = tuple(error["loc"])
        source = sources.get(str(location[0]), str(path)) if location else str(path)
        message = error["msg"].removeprefix("Value error, ")
        shown = "" if any("password" in str(p) for p in location) or not location else f", got {error['input']!r}"
        raise ConfigError(f"{_where(location)}: {message}{shown} (from {source})") from None
