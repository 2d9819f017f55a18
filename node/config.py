"""Configuration: embedded defaults, overridden by a TOML file, overridden by environment variables.

Every setting is checked when the node starts; a bad one is refused with a message that names it
and says where the value came from (``node.port: must be an integer, got 'abc' (from environment
variable MUSCLENODE_PORT)``), so that an installer never has to guess which line is wrong.

The settings are pydantic models, one per section of the file (``[node]``, ``[jobs]``, ...), inside
:class:`Config`, a pydantic-settings ``BaseSettings``. Its ``settings_customise_sources`` hook puts
the sources in order: environment variables (:class:`EnvironmentSource`), then the TOML file
(pydantic-settings' ``TomlConfigSettingsSource``); what neither gives is the field's default.
Validation errors are turned into the messages above by :func:`load_config`.

Adding a setting
----------------
Add one field to its section's model::

    class JobsSettings(Section):
        timeout_seconds: Seconds = setting(600.0, "a job running longer than this fails",
                                           env="MUSCLENODE_JOB_TIMEOUT")

The type says what is valid (reuse :data:`Port`, :data:`Seconds`, :func:`bounded`, :func:`one_of`
or :func:`matching`, or any pydantic type); the default is the embedded configuration; ``env``
(optional) names an environment variable that overrides it; the description is the meaning in the
README's table. Read it as ``config.jobs.timeout_seconds``. ``config show``, the environment, the
error messages and the table (``musclenode config settings``, which ``tests/test_config.py`` checks
against the README) follow from the field. A new section is a new :class:`Section` subclass and
one field of :class:`Config` holding it, declared before ``peers``.

The settings that existed before the sections can also be read under a flat name
(``config.port`` is ``config.node.port``), given by ``shortcut=`` on their field; new settings are
read through their section.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from inference.geometry import MAX_OBLIQUE_DEGREES
from inference.vocabulary import FatMethod, vertebra_range

__all__ = [
    "Config",
    "ConfigError",
    "Destination",
    "Pacs",
    "Peer",
    "Rules",
    "Section",
    "TLS",
    "ENVIRONMENT",
    "load_config",
    "setting",
    "settings_table",
    "to_toml",
]


class ConfigError(ValueError):
    """A setting is missing, unknown or has a value the node cannot use."""


class SettingError(ValueError):
    """Settings that are valid one by one but not together; ``key`` names the one to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------
# Types: what a valid value is, with the message that says so
# ---------------------------------------------------------------------------------------------


def _check(test: Callable[[Any], bool], message: str) -> AfterValidator:
    """A validator that refuses a parsed value failing ``test`` with ``message``."""

    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _refuse_booleans(message: str) -> BeforeValidator:
    """pydantic reads ``true`` as 1 for numbers; a setting file saying ``port = true`` is a mistake."""

    def refuse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(message)
        return value

    return BeforeValidator(refuse)


def bounded(low: float, high: float, message: str | None = None) -> AfterValidator:
    """A number from ``low`` to ``high`` inclusive (NaN is refused)."""
    return _check(lambda v: not math.isnan(v) and low <= v <= high, message or f"must be between {low:g} and {high:g}")


def one_of(*choices: str, fold: Callable[[str], str] = str.lower) -> BeforeValidator:
    """One of ``choices``, compared after ``fold`` (lower case by default); gives the choice."""
    folded = {fold(c): c for c in choices}
    wording = f"must be {', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else f"must be {choices[0]}"

    def choose(value: Any) -> str:
        if not isinstance(value, str) or fold(value.strip()) not in folded:
            raise ValueError(wording)
        return folded[fold(value.strip())]

    return BeforeValidator(choose)


def matching(pattern: str, message: str) -> AfterValidator:
    """A string matching the regular expression ``pattern`` in full, after stripping spaces."""
    compiled = re.compile(pattern)

    def match(value: str) -> str:
        value = value.strip()
        if not compiled.fullmatch(value):
            raise ValueError(message)
        return value

    return AfterValidator(match)


def _split(value: Any) -> Any:
    """A list may be written as one comma-separated string (convenient in environment variables)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16:
        raise ValueError("must be 1 to 16 characters")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("must be printable ASCII without backslash")
    return value


def _host(value: str) -> str:
    value = value.strip()
    if value == "*":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", value):
            raise ValueError("must be an IP address or host name") from None
    return value


def _bind_address(value: str) -> str:
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IP address to listen on, such as 0.0.0.0 or 127.0.0.1") from None
    return value


def _patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return patterns


def _levels(value: str) -> str:
    """A range of the vocabulary's vertebrae (``L1-L5``), or empty for none."""
    if value.strip():
        try:
            vertebra_range(value)
        except ValueError:
            raise ValueError("must be a level range such as L1-L5, or empty for none") from None
    return value.strip()


def _optional(value: Any) -> Any:
    """An empty string means "none" (``config show`` writes an unset path as ``""``)."""
    return None if value == "" else value


def _folder(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a folder path")
    return value


Integer = Annotated[int, _refuse_booleans("must be an integer")]
Number = Annotated[float, _refuse_booleans("must be a number")]
Port = Annotated[Integer, bounded(1, 65535, "must be a TCP port between 1 and 65535")]
Seconds = Annotated[Number, bounded(0, 86400, "must be between 0 and 86400 seconds")]
NonNegative = Annotated[Integer, _check(lambda v: v >= 0, "must not be negative")]
AETitle = Annotated[str, AfterValidator(_ae_title)]
Host = Annotated[str, AfterValidator(_host)]
BindAddress = Annotated[str, AfterValidator(_bind_address)]
Name = Annotated[str, matching(r"[ -~]{1,64}", "must be 1 to 64 printable ASCII characters")]
Folder = Annotated[Path, BeforeValidator(_folder), AfterValidator(Path.expanduser)]
OptionalFile = Annotated[Path | None, BeforeValidator(_optional), AfterValidator(lambda p: p and p.expanduser())]
Folders = Annotated[tuple[Path, ...], BeforeValidator(_split), AfterValidator(lambda ps: tuple(p.expanduser() for p in ps))]
UpperStrings = Annotated[tuple[str, ...], BeforeValidator(_split), AfterValidator(lambda vs: tuple(v.strip().upper() for v in vs))]
Patterns = Annotated[tuple[str, ...], BeforeValidator(_split), AfterValidator(_patterns)]


def setting(default: Any, description: str, *, env: str | None = None, shortcut: str | None = None) -> Any:
    """A setting's default, meaning, environment variable and (for old code) flat attribute name.

    Parameters
    ----------
    default
        The embedded default; ``...`` for a key that a ``[[peers]]`` or ``[[destinations]]``
        table must give.
    description : str
        What it means, as the README's table says it.
    env : str, optional
        An environment variable (``MUSCLENODE_...``) that overrides the file and the default.
    shortcut : str, optional
        Also readable as ``config.<shortcut>`` (kept for the settings that existed before the
        sections; new settings are read through their section).
    """
    extra = {key: value for key, value in (("env", env), ("shortcut", shortcut)) if value}
    return Field(default, description=description, json_schema_extra=extra or None)


def _extra(field: FieldInfo, key: str) -> str | None:
    extra = field.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class Section(BaseModel):
    """A table of the configuration file: unknown keys are refused, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NodeSettings(Section):
    """``[node]``: who the node is on the network, and where it keeps what it receives."""

    ae_title: AETitle = setting("MUSCLENODE", "the node's AE title; calls to another called AE title are rejected",
                                env="MUSCLENODE_AE_TITLE", shortcut="ae_title")
    host: BindAddress = setting("0.0.0.0", "address to listen on", env="MUSCLENODE_HOST", shortcut="host")
    port: Port = setting(11112, "DICOM port", env="MUSCLENODE_PORT", shortcut="port")
    data: Folder = setting(Path("musclenode-data"),
                           "data folder: `studies/STUDY/SERIES/SOP.dcm`, `incoming/`, `index.sqlite`,"
                           " `results/SERIES/SOP.dcm` (the node's own results), `audit.log`",
                           env="MUSCLENODE_DATA", shortcut="data")
    open: bool = setting(False, "accept any calling AE from any address", env="MUSCLENODE_OPEN", shortcut="open")
    min_free_mb: NonNegative = setting(
        1024, "below this much free disk, C-STORE is answered 0xA700 (out of resources) and nothing is written",
        env="MUSCLENODE_MIN_FREE_MB", shortcut="min_free_mb")
    max_pdu: NonNegative = setting(
        1048576, "maximum PDU the node receives (each PDU is held in memory whole; `0` means no limit)",
        env="MUSCLENODE_MAX_PDU", shortcut="max_pdu")
    pynetdicom_polling: bool = setting(
        False, "associations poll their socket and queues every millisecond as stock pynetdicom does, instead of"
        " waiting for them (for comparison in `bench/receive_rate.py`, or as a fallback)",
        env="MUSCLENODE_PYNETDICOM_POLLING", shortcut="pynetdicom_polling")
    log_level: Annotated[str, one_of("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper)] = setting(
        "INFO", "DEBUG, INFO, WARNING, ERROR", env="MUSCLENODE_LOG_LEVEL", shortcut="log_level")
    log_patient_data: bool = setting(False, "logs carry no patient identifiers unless this is set",
                                     env="MUSCLENODE_LOG_PATIENT_DATA", shortcut="log_patient_data")
    log_format: Annotated[str, one_of("json", "text")] = setting(
        "json", "`json` (one object a line) or `text`; the audit log `audit.log` in the data folder records every"
        " association the node judges (accepted, rejected, how it ended) and every export; an association to"
        " another called AE title is rejected by pynetdicom before that and is not in it",
        env="MUSCLENODE_LOG_FORMAT", shortcut="log_format")


class AssemblySettings(Section):
    """``[assembly]``: when a series counts as complete."""

    quiet_seconds: Seconds = setting(
        30.0, "a series is ready this long after its last instance, once its association has ended",
        env="MUSCLENODE_QUIET_SECONDS", shortcut="quiet_seconds")


class ModelSettings(Section):
    """``[model]``: the segmentation model."""

    name: Annotated[str, matching(
        r"[A-Za-z0-9_.-]{1,64}(@[A-Za-z0-9_.+!-]{1,64})?",
        "must be a model name of letters, digits, '_', '.' or '-', optionally '@' and a version")] = setting(
        "musclenode-lumbar-dixon", "the segmentation model (`musclenode models list`), optionally `@VERSION`",
        env="MUSCLENODE_MODEL", shortcut="model_name")
    dirs: Folders = setting((), "extra folders with model cards and ONNX files (site models, imported MuscleMap"
                            " models)", shortcut="model_dirs")


class JobsSettings(Section):
    """``[jobs]``: the workers that run the pipeline."""

    # One worker with every core suits a CPU node: ONNX Runtime parallelises within a slice.
    workers: Annotated[Integer, bounded(0, 64)] = setting(
        1, "worker threads; `0` makes a receive-only node", env="MUSCLENODE_WORKERS", shortcut="workers")
    device: Annotated[str, one_of("auto", "cpu", "cuda")] = setting(
        "auto", "`auto` (CUDA when onnxruntime-gpu finds a GPU), `cpu`, `cuda`",
        env="MUSCLENODE_DEVICE", shortcut="device")
    threads: Annotated[Integer, bounded(0, 256)] = setting(
        0, "ONNX Runtime threads per worker; `0`: all cores", env="MUSCLENODE_THREADS", shortcut="threads")
    max_attempts: Annotated[Integer, bounded(1, 100)] = setting(
        4, "a job failing transiently this often fails for good", shortcut="max_attempts")
    retry_seconds: Seconds = setting(10.0, "first retry delay, doubling", shortcut="retry_seconds")


_CLUSTERING = tuple(method.value for method in FatMethod.clustering_methods())


class MetricsSettings(Section):
    """``[metrics]``: how muscles are measured."""

    erode_fat: bool = setting(True, "fat fraction after a one-pixel erosion of each mask (against partial volume"
                              " at the fascia)", shortcut="erode_fat")
    cluster_method: Annotated[FatMethod, one_of(*_CLUSTERING)] = setting(
        FatMethod.GMM3, "T1/T2 fat infiltration: " + ", ".join(f"`{m}`" for m in _CLUSTERING),
        shortcut="cluster_method")
    assume_levels: Annotated[str, AfterValidator(_levels)] = setting(
        "L1-L5", "without identified vertebral levels, the series is compared with this level range of the"
        " reference (stated in every result)", shortcut="assume_levels")


class ReferenceSettings(Section):
    """``[reference]``: what measurements are compared with."""

    site: OptionalFile = setting(None, "a site reference (centile curves, JSON) made by `musclenode reference fit`;"
                                 " preferred over the published table", shortcut="site_reference")
    site_name: Annotated[Name | None, BeforeValidator(_optional)] = setting(
        None, "this node's site (or scanner) as the site reference's cohort names it; none: z-scores against the"
        " average of the cohort's sites (stated in every result)")


class HTTPSettings(Section):
    """``[http]``: the health and metrics endpoint."""

    host: BindAddress = setting("127.0.0.1", "address of `GET /health` and `GET /metrics` (Prometheus)",
                                shortcut="http_host")
    port: Annotated[Integer, bounded(0, 65535, "must be 0 (off) or a TCP port between 1 and 65535")] = setting(
        8089, "port of the health and metrics endpoint; `0` turns it off", env="MUSCLENODE_HTTP_PORT",
        shortcut="http_port")


class TLS(Section):
    """``[tls]``: DICOM TLS (PS3.15 Annex B.1), a second listening port and the export SCU's credentials."""

    enabled: bool = setting(False, "DICOM TLS on `tls.port`", env="MUSCLENODE_TLS")
    port: Port = setting(2762, "the TLS port (the plain port stays open unless `tls.plain = false`)",
                         env="MUSCLENODE_TLS_PORT")
    plain: bool = setting(True, "keep listening on `node.port` without TLS")
    certificate: OptionalFile = setting(None, "the node's certificate chain (PEM): server certificate for the TLS"
                                        " port, client certificate for destinations with `tls = true`")
    key: OptionalFile = setting(None, "the node's private key (PEM)")
    ca: OptionalFile = setting(None, "CA certificates (PEM) that peers' and destinations' certificates are"
                               " checked against")
    require_client_certificate: bool = setting(
        False, "every TLS caller must present a certificate signed by `tls.ca`")


class Limits(Section):
    """What one connection, one peer and one instance may take of the DICOM listener (``[limits]``)."""

    request_seconds: Annotated[Number, bounded(0.001, 86400, "must be more than 0 seconds")] = setting(
        10.0, "a new connection has this long for its TLS handshake and its whole A-ASSOCIATE-RQ, then it is"
        " closed (connections still waiting take no association slot)")
    idle_seconds: Annotated[Number, bounded(0.001, 86400, "must be more than 0 seconds")] = setting(
        120.0, "an association silent this long (or stopped inside a PDU) is aborted by the node")
    associations: Annotated[Integer, bounded(1, 1000)] = setting(32, "associations at once, all peers together")
    associations_per_peer: Annotated[Integer, bounded(1, 1000)] = setting(
        8, "associations at once from one peer (one calling AE title at one address)")
    instance_mb: Annotated[Integer, bounded(1, 1 << 20)] = setting(
        2048, "the largest instance accepted (MiB); a larger one is refused with 0xA700 (out of resources)")

    @model_validator(mode="after")
    def _per_peer_within_all(self) -> "Limits":
        if self.associations_per_peer > self.associations:
            raise SettingError("limits.associations_per_peer", f"{self.associations_per_peer} is more than"
                               f" limits.associations ({self.associations})")
        return self


class Rules(Section):
    """``[rules]``: which series the node processes; see :mod:`node.orchestration.rules` for how."""

    modalities: UpperStrings = setting(("MR",), "modalities considered")
    lumbar_body_parts: UpperStrings = setting(
        ("LSPINE", "LUMBARSPINE", "LUMBAR", "LSSPINE", "LUMBOSACRAL", "LWS", "L-SPINE", "LSP"),
        "BodyPartExamined values that mean lumbar")
    # Body parts that some scanners write for a lumbar examination but that also cover other
    # regions: they count as lumbar only when a description says so.
    ambiguous_body_parts: UpperStrings = setting(
        ("", "SPINE", "TSPINE", "TLSPINE", "SSPINE", "ABDOMEN", "PELVIS", "BACK", "WHOLEBODY"),
        "body parts decided by the descriptions")
    lumbar_patterns: Patterns = setting(
        (r"lumb", r"\bl[ -]?spine\b", r"\blws\b", r"lenden", r"\bls[ -]?wk?s\b", r"\bl[1-5]\b"),
        "regular expressions on study, series and protocol descriptions")
    exclude_patterns: Patterns = setting(
        (r"cervic", r"\bhws\b", r"\bc[ -]?spine\b", r"thorac", r"\bbws\b", r"brain", r"head",
         r"\bknee", r"shoulder", r"localizer", r"scout", r"survey", r"\bloc\b", r"mip\b"),
        "descriptions that exclude a series")
    fat_suppressed_patterns: Patterns = setting(
        (r"\bstir\b", r"\bfs\b", r"fat[ _-]?sat", r"\bspair\b", r"\bspir\b", r"\bfatsup"),
        "fat-suppressed series are skipped (there is no fat signal to measure)")
    max_oblique_degrees: Annotated[Number, _check(lambda v: 0 < v < 90, "must be an angle strictly between 0 and"
                                                  " 90 degrees")] = setting(
        MAX_OBLIQUE_DEGREES, "a slice is axial when its normal is within this angle of the head-foot axis; a series is"
        " axial when most of its slices are, and the others are set aside")


#: Dashboard roles: ``viewer`` reads; ``operator`` may also retry and resend deliveries.
ROLES = ("viewer", "operator")


def _argon2_hash(value: str) -> str:
    if value:
        import argon2  # the dashboard's password hashing; imported where a hash is checked

        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            raise ValueError("must be an argon2 hash made by `musclenode dashboard hash-password`") from None
    return value


def _networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return value


class DashboardUser(Section):
    """A person who may log in to the dashboard (a ``[[dashboard.users]]`` table)."""

    name: Annotated[str, matching(r"[A-Za-z0-9_.@-]{1,64}", "must be 1 to 64 letters, digits or _.@-")] = setting(
        ..., "the login name")
    role: Annotated[str, one_of(*ROLES)] = setting(..., "`viewer` (read) or `operator` (may also retry and resend)")
    password_hash: Annotated[str, AfterValidator(_argon2_hash)] = setting(
        "", "from `musclenode dashboard hash-password`; empty: this user logs in only through the proxy header")


class DashboardSettings(Section):
    """The web dashboard: where it listens, who may log in, how long a session lasts."""

    host: BindAddress = setting("127.0.0.1", "address the dashboard listens on", env="MUSCLENODE_DASHBOARD_HOST")
    port: Annotated[Integer, bounded(0, 65535, "must be 0 (off) or a TCP port between 1 and 65535")] = setting(
        8090, "the dashboard's port; `0` turns it off (it is off anyway until someone can log in)",
        env="MUSCLENODE_DASHBOARD_PORT")
    session_minutes: Annotated[Number, bounded(1, 24 * 60, "must be between 1 and 1440 minutes")] = setting(
        30.0, "a session ends this long after the last page or action (live updates do not count)")
    session_hours: Annotated[Number, bounded(0.1, 7 * 24, "must be between 0.1 and 168 hours")] = setting(
        12.0, "and this long after the login in any case")
    proxy_header: Annotated[str, matching(r"[A-Za-z0-9-]{0,64}", "must be an HTTP header name")] = setting(
        "", "single sign-on: the request header in which a reverse proxy names the user")
    trusted_proxies: Annotated[tuple[str, ...], BeforeValidator(_split), AfterValidator(_networks)] = setting(
        (), "addresses or networks of that proxy; the header is ignored from anywhere else")
    users: tuple[DashboardUser, ...] = setting((), "who may log in (`[[dashboard.users]]` tables)")

    @model_validator(mode="after")
    def _consistent(self) -> "DashboardSettings":
        names = [u.name for u in self.users]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SettingError("dashboard.users", f"the name {twice[0]!r} is used twice")
        if self.proxy_header and not self.trusted_proxies:
            raise SettingError("dashboard.proxy_header", "needs dashboard.trusted_proxies: the reverse proxy's addresses")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the dashboard runs: a port, and a way to log in."""
        return self.port != 0 and (bool(self.proxy_header) or any(u.password_hash for u in self.users))

    def user(self, name: str) -> DashboardUser | None:
        """The configured user of this name, or None."""
        return next((u for u in self.users if u.name == name), None)


class Peer(Section):
    """A DICOM application entity that may open associations to the node (a ``[[peers]]`` table)."""

    ae_title: Annotated[str, AfterValidator(lambda v: "*" if v.strip() == "*" else _ae_title(v))] = setting(
        ..., "the calling AE title, or `\"*\"` for any")
    host: Host = setting("*", "the address it calls from, or `\"*\"` for any")
    port: Port | None = setting(None, "where the peer listens; needed only to send results back to it")
    quiet_seconds: Seconds | None = setting(None, "quiet time for series from this peer, instead of"
                                            " `assembly.quiet_seconds`")
    require_certificate: bool = setting(False, "this peer must call over TLS with a client certificate signed by"
                                        " `tls.ca`")

    def matches(self, ae_title: str, address: str) -> bool:
        """Return whether a calling AE title and address belong to this peer."""
        ae_ok = self.ae_title == "*" or self.ae_title == ae_title.strip()
        return ae_ok and (self.host == "*" or self.host == address)


class Destination(Section):
    """A storage SCP that receives the node's results (a ``[[destinations]]`` table)."""

    name: Name = setting(..., "the destination's name (`musclenode resend JOB NAME`)")
    ae_title: AETitle = setting(..., "its AE title")
    host: Host = setting(..., "its address")
    port: Port = setting(..., "its DICOM port")
    tls: bool = setting(False, "send over TLS (checked against `tls.ca`, with the node's certificate)")


def _url(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


class Pacs(Section):
    """An archive that research cohorts are queried and fetched from (a ``[[pacs]]`` table)."""

    name: Name = setting(..., "the archive's name (`musclenode cohort ... --pacs NAME`)")
    ae_title: AETitle = setting(..., "the AE title of its query/retrieve SCP (C-FIND, C-MOVE, C-GET)")
    host: Host = setting(..., "its address")
    port: Port = setting(..., "its DICOM port")
    retrieve: Annotated[str, one_of("move", "get", "dicomweb")] = setting(
        "move", "how `cohort fetch` retrieves: `move` (C-MOVE into this node; the archive must know it), `get`"
        " (C-GET) or `dicomweb` (WADO-RS) into a folder")
    dicomweb: Annotated[str | None, BeforeValidator(_optional), AfterValidator(_url)] = setting(
        None, "base URL of its DICOMweb service (QIDO-RS, WADO-RS), e.g. `http://pacs:8042/dicom-web`")


# ---------------------------------------------------------------------------------------------
# The configuration and its sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """What one :func:`load_config` call reads.

    ``settings_customise_sources`` is a class method without per-call arguments, so
    :func:`load_config` hands it the file and the environment through a context variable.
    """

    file: TomlConfigSettingsSource | None
    environ: Mapping[str, str]


_REQUEST: ContextVar[_Request | None] = ContextVar("musclenode_config_request", default=None)


class EnvironmentSource(PydanticBaseSettingsSource):
    """The ``MUSCLENODE_*`` variables named by the fields (``env=`` in :func:`setting`)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` reads the nested fields itself."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, variable in ENVIRONMENT_OF.items():
            if variable in self.environ:
                section, name = key.split(".")
                values.setdefault(section, {})[name] = self.environ[variable]
        return values


class Config(BaseSettings):
    """The node's effective configuration. Build it with :func:`load_config`.

    ``Config()`` alone gives the embedded defaults (keyword arguments override them, as nested
    dictionaries: ``Config(node={"port": 4242})``); only :func:`load_config` reads the environment
    and a file. ``sources`` maps each setting (``node.port``, ``peers``) to where its value came
    from: ``default``, the file's path, or ``environment variable NAME``.
    """

    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=True, case_sensitive=True)

    node: NodeSettings = Field(default_factory=NodeSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    http: HTTPSettings = Field(default_factory=HTTPSettings)
    tls: TLS = Field(default_factory=TLS)
    limits: Limits = Field(default_factory=Limits)
    rules: Rules = Field(default_factory=Rules)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    # Lists of tables come last, so that config show can write them after the sections.
    peers: tuple[Peer, ...] = Field(
        # A closed node that still answers a local echoscu or storescu out of the box.
        default=(Peer(ae_title="*", host="127.0.0.1"),),
        description="who may call: a file's `[[peers]]` replace the default; `node.open = true` lets anyone call")
    destinations: tuple[Destination, ...] = Field(
        default=(), description="where results go; without any, back to the peer that sent the study")
    pacs: tuple[Pacs, ...] = Field(
        default=(), description="archives that research cohorts are queried and fetched from (`musclenode cohort`)")

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then environment variables, then the TOML file; the defaults after them."""
        request = _REQUEST.get()
        if request is None:
            return (init_settings,)
        sources: list[PydanticBaseSettingsSource] = [init_settings, EnvironmentSource(settings_cls, request.environ)]
        if request.file is not None:
            sources.append(request.file)
        return tuple(sources)

    @model_validator(mode="after")
    def _destinations_have_their_own_names(self) -> "Config":
        names = [d.name for d in self.destinations]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise SettingError("destinations", f"the name {duplicated[0]!r} is used twice")
        return self

    @model_validator(mode="after")
    def _archives_have_their_own_names_and_urls(self) -> "Config":
        names = [p.name for p in self.pacs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise SettingError("pacs", f"the name {duplicated[0]!r} is used twice")
        for number, archive in enumerate(self.pacs, start=1):
            if archive.retrieve == "dicomweb" and archive.dicomweb is None:
                raise SettingError("pacs", f"pacs[{number}] ({archive.name}) retrieves by dicomweb but has no"
                                   " dicomweb URL")
        return self

    @model_validator(mode="after")
    def _tls_settings_work_together(self) -> "Config":
        """Refuse TLS settings that cannot work together (the files are read by :mod:`node.network.tls`)."""
        tls = self.tls
        needs_certificate = [p.ae_title for p in self.peers if p.require_certificate]
        if not tls.enabled:
            if needs_certificate:
                raise SettingError("peers", f"{needs_certificate[0]!r} has require_certificate = true but"
                                   " tls.enabled is false")
            if not tls.plain:
                raise SettingError("tls.plain", "false leaves no DICOM port while tls.enabled is false")
        if tls.enabled or any(d.tls for d in self.destinations):
            for key in ("certificate", "key"):
                if tls.enabled and getattr(tls, key) is None:
                    raise SettingError(f"tls.{key}", "required when tls.enabled is true")
            if (tls.certificate is None) != (tls.key is None):
                missing, given = ("key", "certificate") if tls.key is None else ("certificate", "key")
                raise SettingError(f"tls.{missing}", f"required with tls.{given}")
        if tls.enabled and tls.ca is None and (tls.require_client_certificate or needs_certificate):
            raise SettingError("tls.ca", "required to check client certificates (tls.require_client_certificate"
                               " or a peer with require_certificate)")
        if tls.enabled and tls.plain and tls.port == self.node.port:
            raise SettingError("tls.port", f"{tls.port} is node.port too; choose another or set tls.plain = false")
        return self

    @property
    def sources(self) -> Mapping[str, str]:
        """Where each setting's value came from, by dotted name (``node.port``; ``peers``)."""
        return self._sources

    def __eq__(self, other: object) -> bool:
        """Equal when every setting is; where the values came from does not count."""
        if not isinstance(other, Config):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def peer_for(self, ae_title: str, address: str) -> Peer | None:
        """Return the first configured peer that matches, or ``None``."""
        return next((p for p in self.peers if p.matches(ae_title, address)), None)

    def quiet_seconds_for(self, ae_title: str, address: str) -> float:
        """Quiet time for series sent by this peer: its own, else the node's."""
        peer = self.peer_for(ae_title, address)
        if peer is None or peer.quiet_seconds is None:
            return self.assembly.quiet_seconds
        return peer.quiet_seconds

    @property
    def index_path(self) -> Path:
        """The SQLite database holding the index, decisions and the job and delivery queues."""
        return self.node.data / "index.sqlite"


def _sections() -> Iterator[tuple[str, type[Section]]]:
    for name, field in Config.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield name, field.annotation


def _settings() -> Iterator[tuple[str, FieldInfo]]:
    """Every setting of the sections, as ``(dotted name, field)``."""
    for section, model in _sections():
        for name, field in model.model_fields.items():
            yield f"{section}.{name}", field


#: The environment variable of each setting that has one, by dotted name.
ENVIRONMENT_OF: dict[str, str] = {key: env for key, field in _settings() if (env := _extra(field, "env"))}
#: Environment variables and the setting each overrides.
ENVIRONMENT: dict[str, str] = {env: key for key, env in ENVIRONMENT_OF.items()}


def _shortcut(section: str, name: str) -> property:
    return property(lambda config: getattr(getattr(config, section), name),
                    doc=f"``{section}.{name}`` (a flat name kept for existing code)")


def _add_shortcuts() -> None:
    for key, field in _settings():
        if (name := _extra(field, "shortcut")) is not None:
            setattr(Config, name, _shortcut(*key.split(".")))


_add_shortcuts()


# ---------------------------------------------------------------------------------------------
# Loading, and errors that name the setting and its source
# ---------------------------------------------------------------------------------------------

#: pydantic's error types, in the words of this node's messages.
_WORDING = {
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be a string", "path_type": "must be a path",
    "tuple_type": "must be a list", "list_type": "must be a list",
    "model_type": "must be a table", "model_attributes_type": "must be a table", "dict_type": "must be a table",
    "missing": "missing", "extra_forbidden": "unknown setting",
}


def _where(loc: tuple[Any, ...]) -> str:
    """``("peers", 0, "port")`` as ``peers[1].port``."""
    text = ""
    for part in loc:
        text += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _source_of(loc: tuple[Any, ...], sources: Mapping[str, str]) -> str:
    """The source of the longest prefix of ``loc`` that has one (``peers`` for ``peers[1].port``)."""
    names = [str(p) for p in loc if not isinstance(p, int)]
    for end in range(len(names), 0, -1):
        if ".".join(names[:end]) in sources:
            return sources[".".join(names[:end])]
    return "default"


def _message(error: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    context = error.get("ctx") or {}
    cause = context.get("error")
    if isinstance(cause, SettingError):
        return f"{cause.key}: {cause} (from {sources.get(cause.key, 'default')})"
    kind, loc = error["type"], tuple(error["loc"])
    if isinstance(cause, Exception):
        wording = str(cause)
    elif kind == "literal_error":
        wording = f"must be {context.get('expected')}"
    else:
        wording = _WORDING.get(kind, error["msg"])
    secret = any("password" in str(part) for part in loc)
    got = "" if kind in ("missing", "extra_forbidden") or secret else f", got {error['input']!r}"
    return f"{_where(loc)}: {wording}{got} (from {_source_of(loc, sources)})"


def _provenance(document: Mapping[str, Any], source: str, sources: dict[str, str]) -> None:
    """Record ``source`` for every table and setting that a file gives."""
    for section, body in document.items():
        sources[section] = source
        if isinstance(body, Mapping):
            for key in body:
                sources[f"{section}.{key}"] = source


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the effective configuration.

    Parameters
    ----------
    path : path-like, optional
        A TOML file. Without one, ``MUSCLENODE_CONFIG`` names it; without that, only the embedded
        defaults and the environment apply.
    environ : mapping, optional
        The environment to read overrides from; ``os.environ`` by default.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        If the file cannot be read or any setting is unknown or invalid. The message names the
        setting and where its value came from, one line per problem.
    """
    environ = os.environ if environ is None else environ
    path = path if path is not None else environ.get("MUSCLENODE_CONFIG") or None
    sources: dict[str, str] = {key: "default" for key, _ in _settings()}
    sources.update(peers="default", destinations="default", pacs="default")
    file = None
    if path is not None:
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"configuration file {path}: no such file")
        try:
            file = TomlConfigSettingsSource(Config, toml_file=Path(path))
        except OSError as exc:
            raise ConfigError(f"configuration file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path}: not valid TOML: {exc}") from None
        _provenance(file(), str(path), sources)
    for variable, key in ENVIRONMENT.items():
        if variable in environ:
            sources[key] = f"environment variable {variable}"

    token = _REQUEST.set(_Request(file, environ))
    try:
        config = Config()
    except ValidationError as exc:
        raise ConfigError("\n".join(_message(e, sources) for e in exc.errors())) from None
    finally:
        _REQUEST.reset(token)
    config._sources = sources
    return config


# ---------------------------------------------------------------------------------------------
# Writing: config show, and the README's table
# ---------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (Path, str)):
        # TOML basic strings share these escapes with Python's for the characters that occur here.
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(config: Config) -> str:
    """Write the effective configuration as TOML, each setting commented with its source."""
    lines: list[str] = []
    for section, model in _sections():
        lines.append(f"[{section}]")
        body = getattr(config, section)
        tables = []
        for key in model.model_fields:
            source = config.sources.get(f"{section}.{key}", "default")
            value = getattr(body, key)
            if _is_tables(model.model_fields[key]):
                tables.append((key, value, source))
                continue
            lines.append(f"{key} = {_toml_value(value)}  # {source}")
        lines.append("")
        for key, items, source in tables:
            for item in items:
                lines.append(f"[[{section}.{key}]]  # {source}")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item if v is not None]
                lines.append("")
    for name in ("peers", "destinations", "pacs"):
        items, source = getattr(config, name), config.sources.get(name, "default")
        if not items:
            lines += [f"# no {name}  # {source}", ""]
        for item in items:
            lines.append(f"[[{name}]]  # {source}")
            lines += [f"{key} = {_toml_value(value)}" for key, value in item if value is not None]
            lines.append("")
    return "\n".join(lines)


def _is_tables(field: FieldInfo) -> bool:
    """Whether a setting is a list of tables (``[[dashboard.users]]``)."""
    args = getattr(field.annotation, "__args__", ())
    return bool(args) and isinstance(args[0], type) and issubclass(args[0], Section)


def _shown(field: FieldInfo) -> str:
    """A setting's default as the README's table shows it."""
    if field.is_required():
        return "required"
    value = field.default
    if value is None or value == () or value == "":
        return "none"
    if isinstance(value, tuple):
        shown = ", ".join(f"`{v}`" if v else '`""`' for v in value[:3])
        return f"{shown}{', ...' if len(value) > 3 else ''}"
    return f"`{_toml_value(value).strip(chr(34))}`"


def settings_table() -> str:
    """Every setting as a Markdown table (setting, default, environment, meaning) for the README."""
    rows = ["| setting | default | environment | meaning |", "|---|---|---|---|"]
    for key, field in _settings():
        env = _extra(field, "env")
        if _is_tables(field):
            rows.append(f"| `[[{key}]]` | none | | {field.description} |")
            for item_key, item_field in field.annotation.__args__[0].model_fields.items():
                rows.append(f"| `[[{key}]] {item_key}` | {_shown(item_field)} | | {item_field.description} |")
            continue
        rows.append(f"| `{key}` | {_shown(field)} | {f'`{env}`' if env else ''} | {field.description} |")
    for name, model in (("peers", Peer), ("destinations", Destination), ("pacs", Pacs)):
        field = Config.model_fields[name]
        default = field.default
        shown = "; ".join(", ".join(f"{k} = {_toml_value(v)}" for k, v in item.model_dump(exclude_defaults=True).items()) for item in default)
        rows.append(f"| `[[{name}]]` | {f'`{shown}`' if shown else 'none'} | | {field.description} |")
        for key, item_field in model.model_fields.items():
            rows.append(f"| `[[{name}]] {key}` | {_shown(item_field)} | | {item_field.description} |")
    return "\n".join(rows)
