"""Configuration: embedded defaults, overridden by a TOML file, overridden by environment variables.

Every setting is checked when the node starts; a bad one is refused with a message that names it
and says where the value came from, so that an installer never has to guess which line is wrong.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from inference.geometry import MAX_OBLIQUE_DEGREES
from inference.vocabulary import FatMethod, vertebra_range

__all__ = [
    "Config",
    "ConfigError",
    "Destination",
    "Peer",
    "Rules",
    "TLS",
    "ENVIRONMENT",
    "load_config",
    "to_toml",
]


class ConfigError(ValueError):
    """A setting is missing, unknown or has a value the node cannot use."""


def _ae_title(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    value = value.strip()
    if not 1 <= len(value) <= 16:
        raise ValueError("must be 1 to 16 characters")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("must be printable ASCII without backslash")
    return value


def _peer_ae_title(value: Any) -> str:
    return "*" if value == "*" else _ae_title(value)


def _port(value: Any) -> int:
    number = _integer(value)
    if not 1 <= number <= 65535:
        raise ValueError("must be a TCP port between 1 and 65535")
    return number


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ValueError("must be an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError("must be an integer") from None


def _fail_format() -> str:
    raise ValueError("must be json or text")


def _bounded(value: Any, low: int, high: int) -> int:
    number = _integer(value)
    if not low <= number <= high:
        raise ValueError(f"must be between {low} and {high}")
    return number


def _non_negative_integer(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number of seconds") from None
    if not 0 <= number <= 86400:
        raise ValueError("must be between 0 and 86400 seconds")
    return number


def _angle(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be an angle in degrees") from None
    if not 0 < number < 90:
        raise ValueError("must be an angle strictly between 0 and 90 degrees")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be an IP address or host name")
    value = value.strip()
    if value == "*":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", value):
            raise ValueError("must be an IP address or host name") from None
    return value


def _bind_address(value: Any) -> str:
    host = _host(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("must be an IP address to listen on, such as 0.0.0.0 or 127.0.0.1") from None
    return host


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a folder path")
    return Path(value).expanduser()


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return value.upper()


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(v.strip() for v in value)


def _patterns(value: Any) -> tuple[str, ...]:
    patterns = _strings(value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return patterns


def _name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("must be a name of letters, digits, '_', '.' or '-'")
    return value


def _device(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in {"auto", "cpu", "cuda"}:
        raise ValueError("must be auto, cpu or cuda")
    return value.lower()


def _cluster_method(value: Any) -> FatMethod:
    methods = FatMethod.clustering_methods()
    if value not in methods:
        raise ValueError(f"must be {', '.join(methods[:-1])} or {methods[-1]}")
    return FatMethod(value)


def _levels(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a level range such as L1-L5, or empty for none")
    if value.strip():
        try:
            vertebra_range(value)
        except ValueError:
            raise ValueError("must be a level range such as L1-L5, or empty for none") from None
    return value.strip()


def _optional_path(value: Any) -> Path | None:
    if value in ("", None):
        return None
    return _path(value)


def _paths(value: Any) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in _strings(value))


def _upper_strings(value: Any) -> tuple[str, ...]:
    return tuple(v.upper() for v in _strings(value))


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity that may open associations to the node.

    Attributes
    ----------
    ae_title : str
        The calling AE title, or ``"*"`` for any.
    host : str
        The address it calls from, or ``"*"`` for any.
    port : int or None
        Where the peer listens; needed only to send results back to it.
    quiet_seconds : float or None
        Quiet time for series from this peer, overriding ``assembly.quiet_seconds``.
    """

    ae_title: str
    host: str = "*"
    port: int | None = None
    quiet_seconds: float | None = None
    #: The peer must call over TLS and present a certificate signed by ``tls.ca``.
    require_certificate: bool = False

    def matches(self, ae_title: str, address: str) -> bool:
        """Return whether a calling AE title and address belong to this peer."""
        ae_ok = self.ae_title == "*" or self.ae_title == ae_title.strip()
        return ae_ok and (self.host == "*" or self.host == address)


@dataclass(frozen=True)
class Destination:
    """A storage SCP that receives the node's results."""

    name: str
    ae_title: str
    host: str
    port: int
    #: Send over TLS, verifying the destination against ``tls.ca`` and presenting the node's
    #: certificate.
    tls: bool = False


@dataclass(frozen=True)
class TLS:
    """DICOM TLS (PS3.15 Annex B.1): a second listening port, and the export SCU's credentials.

    Attributes
    ----------
    enabled : bool
        Listen for TLS associations on ``port``.
    port : int
        The TLS port (2762 is registered for DICOM over TLS).
    plain : bool
        Keep listening without TLS on ``node.port`` as well.
    certificate, key : Path or None
        The node's certificate chain and private key (PEM): server certificate for the TLS port,
        client certificate for destinations with ``tls = true``.
    ca : Path or None
        CA certificates (PEM) that peers' and destinations' certificates are checked against.
    require_client_certificate : bool
        Every TLS caller must present a certificate signed by ``ca``.
    """

    enabled: bool = False
    port: int = 2762
    plain: bool = True
    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class Rules:
    """Which series the node processes; see :mod:`node.rules` for how they are applied."""

    modalities: tuple[str, ...]
    lumbar_body_parts: tuple[str, ...]
    ambiguous_body_parts: tuple[str, ...]
    lumbar_patterns: tuple[str, ...]
    exclude_patterns: tuple[str, ...]
    fat_suppressed_patterns: tuple[str, ...]
    max_oblique_degrees: float


@dataclass(frozen=True)
class Config:
    """The node's effective configuration. Build it with :func:`load_config`."""

    ae_title: str
    host: str
    port: int
    data: Path
    open: bool
    min_free_mb: int
    max_pdu: int
    log_level: str
    log_patient_data: bool
    log_format: str
    quiet_seconds: float
    model_name: str
    model_dirs: tuple[Path, ...]
    workers: int
    device: str
    threads: int
    max_attempts: int
    retry_seconds: float
    erode_fat: bool
    cluster_method: FatMethod
    assume_levels: str
    site_reference: Path | None
    http_host: str
    http_port: int
    peers: tuple[Peer, ...]
    destinations: tuple[Destination, ...]
    rules: Rules
    tls: TLS = field(default_factory=TLS)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def peer_for(self, ae_title: str, address: str) -> Peer | None:
        """Return the first configured peer that matches, or ``None``."""
        return next((p for p in self.peers if p.matches(ae_title, address)), None)

    def quiet_seconds_for(self, ae_title: str, address: str) -> float:
        """Quiet time for series sent by this peer: its own, else the node's."""
        peer = self.peer_for(ae_title, address)
        if peer is None or peer.quiet_seconds is None:
            return self.quiet_seconds
        return peer.quiet_seconds

    @property
    def index_path(self) -> Path:
        """The SQLite database holding the index, decisions and, later, the job queue."""
        return self.data / "index.sqlite"


# Each scalar setting: section, key, parser, default. The defaults are the embedded configuration,
# so ``musclenode serve`` with no file starts a working node that listens to this machine only.
_SCALARS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "node.ae_title": (_ae_title, "MUSCLENODE"),
    "node.host": (_bind_address, "0.0.0.0"),
    "node.port": (_port, 11112),
    "node.data": (_path, "musclenode-data"),
    "node.open": (_boolean, False),
    "node.min_free_mb": (_non_negative_integer, 1024),
    "node.max_pdu": (_non_negative_integer, 0),
    "node.log_level": (_log_level, "INFO"),
    "node.log_patient_data": (_boolean, False),
    "node.log_format": (lambda v: v if v in ("json", "text") else _fail_format(), "json"),
    "assembly.quiet_seconds": (_seconds, 30.0),
    "model.name": (_name, "musclenode-lumbar-dixon"),
    "model.dirs": (_paths, []),
    # One worker with every core suits a CPU node: ONNX Runtime parallelises within a slice.
    # 0 makes a receive-only node: series are judged and jobs queued, but nothing runs them.
    "jobs.workers": (lambda v: _bounded(v, 0, 64), 1),
    "jobs.device": (_device, "auto"),
    "jobs.threads": (lambda v: _bounded(v, 0, 256), 0),
    "jobs.max_attempts": (lambda v: _bounded(v, 1, 100), 4),
    "jobs.retry_seconds": (_seconds, 10.0),
    "metrics.erode_fat": (_boolean, True),
    "metrics.cluster_method": (_cluster_method, FatMethod.GMM3),
    "metrics.assume_levels": (_levels, "L1-L5"),
    "reference.site": (_optional_path, ""),
    "http.host": (_bind_address, "127.0.0.1"),
    "http.port": (lambda v: 0 if _integer(v) == 0 else _port(v), 8089),
    "rules.modalities": (_upper_strings, ["MR"]),
    "rules.lumbar_body_parts": (
        _upper_strings,
        ["LSPINE", "LUMBARSPINE", "LUMBAR", "LSSPINE", "LUMBOSACRAL", "LWS", "L-SPINE", "LSP"],
    ),
    # Body parts that some scanners write for a lumbar examination but that also cover other
    # regions: they count as lumbar only when a description says so.
    "rules.ambiguous_body_parts": (
        _upper_strings,
        ["", "SPINE", "TSPINE", "TLSPINE", "SSPINE", "ABDOMEN", "PELVIS", "BACK", "WHOLEBODY"],
    ),
    "rules.lumbar_patterns": (
        _patterns,
        [r"lumb", r"\bl[ -]?spine\b", r"\blws\b", r"lenden", r"\bls[ -]?wk?s\b", r"\bl[1-5]\b"],
    ),
    "rules.exclude_patterns": (
        _patterns,
        [
            r"cervic", r"\bhws\b", r"\bc[ -]?spine\b", r"thorac", r"\bbws\b", r"brain", r"head",
            r"\bknee", r"shoulder", r"localizer", r"scout", r"survey", r"\bloc\b", r"mip\b",
        ],
    ),
    "rules.fat_suppressed_patterns": (
        _patterns,
        [r"\bstir\b", r"\bfs\b", r"fat[ _-]?sat", r"\bspair\b", r"\bspir\b", r"\bfatsup"],
    ),
    "rules.max_oblique_degrees": (_angle, MAX_OBLIQUE_DEGREES),
    "tls.enabled": (_boolean, False),
    "tls.port": (_port, 2762),
    "tls.plain": (_boolean, True),
    "tls.certificate": (_optional_path, ""),
    "tls.key": (_optional_path, ""),
    "tls.ca": (_optional_path, ""),
    "tls.require_client_certificate": (_boolean, False),
}

_PEER_KEYS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "ae_title": (_peer_ae_title, True),
    "host": (_host, False),
    "port": (_port, False),
    "quiet_seconds": (_seconds, False),
    "require_certificate": (_boolean, False),
}
_DESTINATION_KEYS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "name": (_name, True),
    "ae_title": (_ae_title, True),
    "host": (_host, True),
    "port": (_port, True),
    "tls": (_boolean, False),
}

#: By default only programs on this machine may call the node: a closed node that still answers
#: a local ``echoscu`` or ``storescu`` out of the box.
_DEFAULT_PEERS: list[dict[str, Any]] = [{"ae_title": "*", "host": "127.0.0.1"}]

#: Environment variables and the setting each overrides.
ENVIRONMENT: dict[str, str] = {
    "MUSCLENODE_AE_TITLE": "node.ae_title",
    "MUSCLENODE_HOST": "node.host",
    "MUSCLENODE_PORT": "node.port",
    "MUSCLENODE_DATA": "node.data",
    "MUSCLENODE_OPEN": "node.open",
    "MUSCLENODE_MIN_FREE_MB": "node.min_free_mb",
    "MUSCLENODE_MAX_PDU": "node.max_pdu",
    "MUSCLENODE_LOG_LEVEL": "node.log_level",
    "MUSCLENODE_LOG_PATIENT_DATA": "node.log_patient_data",
    "MUSCLENODE_LOG_FORMAT": "node.log_format",
    "MUSCLENODE_QUIET_SECONDS": "assembly.quiet_seconds",
    "MUSCLENODE_MODEL": "model.name",
    "MUSCLENODE_WORKERS": "jobs.workers",
    "MUSCLENODE_DEVICE": "jobs.device",
    "MUSCLENODE_THREADS": "jobs.threads",
    "MUSCLENODE_HTTP_PORT": "http.port",
    "MUSCLENODE_TLS": "tls.enabled",
    "MUSCLENODE_TLS_PORT": "tls.port",
}




def _parse_tables(
    tables: Any, keys: Mapping[str, tuple[Callable[[Any], Any], bool]], name: str, source: str
) -> list[dict[str, Any]]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{name}: must be a list of tables ([[{name}]]) (from {source})")
    parsed = []
    for number, table in enumerate(tables, start=1):
        where = f"{name}[{number}]"
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown setting (from {source})")
        item: dict[str, Any] = {}
        for key, (parse, required) in keys.items():
            if key not in table:
                if required:
                    raise ConfigError(f"{where}.{key}: missing (from {source})")
                continue
            try:
                item[key] = parse(table[key])
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}: {exc}, got {table[key]!r} (from {source})") from None
        parsed.append(item)
    return parsed


def _flatten(document: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in document.items():
        if section in ("peers", "destinations"):
            flat[section] = body
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: unknown setting (from {source})")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if dotted not in _SCALARS:
                raise ConfigError(f"{dotted}: unknown setting (from {source})")
            flat[dotted] = value
    return flat


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
        setting and where its value came from.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {key: default for key, (_, default) in _SCALARS.items()}
    raw["peers"] = _DEFAULT_PEERS
    raw["destinations"] = []
    sources = {key: "default" for key in raw}

    path = path if path is not None else environ.get("MUSCLENODE_CONFIG") or None
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"configuration file {source}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {source}: not valid TOML: {exc}") from None
        for key, value in _flatten(document, source).items():
            raw[key], sources[key] = value, source

    for variable, key in ENVIRONMENT.items():
        if variable in environ:
            raw[key], sources[key] = environ[variable], f"environment variable {variable}"

    values: dict[str, Any] = {}
    for key, (parse, _) in _SCALARS.items():
        try:
            values[key] = parse(raw[key])
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}, got {raw[key]!r} (from {sources[key]})") from None

    peers = [Peer(**p) for p in _parse_tables(raw["peers"], _PEER_KEYS, "peers", sources["peers"])]
    destinations = [
        Destination(**d)
        for d in _parse_tables(raw["destinations"], _DESTINATION_KEYS, "destinations", sources["destinations"])
    ]
    names = [d.name for d in destinations]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"destinations: the name {duplicated[0]!r} is used twice (from {sources['destinations']})")

    rules = Rules(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("rules.")})
    tls = TLS(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("tls.")})
    _check_tls(tls, peers, destinations, values["node.port"], sources)
    return Config(
        ae_title=values["node.ae_title"],
        host=values["node.host"],
        port=values["node.port"],
        data=values["node.data"],
        open=values["node.open"],
        min_free_mb=values["node.min_free_mb"],
        max_pdu=values["node.max_pdu"],
        log_level=values["node.log_level"],
        log_patient_data=values["node.log_patient_data"],
        log_format=values["node.log_format"],
        quiet_seconds=values["assembly.quiet_seconds"],
        model_name=values["model.name"],
        model_dirs=values["model.dirs"],
        workers=values["jobs.workers"],
        device=values["jobs.device"],
        threads=values["jobs.threads"],
        max_attempts=values["jobs.max_attempts"],
        retry_seconds=values["jobs.retry_seconds"],
        erode_fat=values["metrics.erode_fat"],
        cluster_method=values["metrics.cluster_method"],
        assume_levels=values["metrics.assume_levels"],
        site_reference=values["reference.site"],
        http_host=values["http.host"],
        http_port=values["http.port"],
        peers=tuple(peers),
        destinations=tuple(destinations),
        rules=rules,
        tls=tls,
        sources=sources,
    )


def _check_tls(tls: TLS, peers: list[Peer], destinations: list[Destination], port: int,
               sources: Mapping[str, str]) -> None:
    """Refuse TLS settings that cannot work together (the files are checked by :mod:`node.tls`)."""
    def where(key: str) -> str:
        return sources.get(key, "default")

    needs_certificate = [p.ae_title for p in peers if p.require_certificate]
    tls_destinations = [d.name for d in destinations if d.tls]
    if not tls.enabled:
        if needs_certificate:
            raise ConfigError(f"peers: {needs_certificate[0]!r} has require_certificate = true but tls.enabled"
                              f" is false (from {where('peers')})")
        if not tls.plain:
            raise ConfigError(f"tls.plain: false leaves no DICOM port while tls.enabled is false"
                              f" (from {where('tls.plain')})")
    if tls.enabled or tls_destinations:
        for key in ("certificate", "key"):
            if tls.enabled and getattr(tls, key) is None:
                raise ConfigError(f"tls.{key}: required when tls.enabled is true (from {where('tls.' + key)})")
        if (tls.certificate is None) != (tls.key is None):
            missing = "key" if tls.key is None else "certificate"
            raise ConfigError(f"tls.{missing}: required with tls.{'certificate' if missing == 'key' else 'key'}"
                              f" (from {where('tls.' + missing)})")
    if tls.enabled and tls.ca is None and (tls.require_client_certificate or needs_certificate):
        raise ConfigError("tls.ca: required to check client certificates (tls.require_client_certificate or a"
                          f" peer with require_certificate) (from {where('tls.ca')})")
    if tls.enabled and tls.plain and tls.port == port:
        raise ConfigError(f"tls.port: {tls.port} is node.port too; choose another or set tls.plain = false"
                          f" (from {where('tls.port')})")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # TOML basic strings share JSON's escapes for the characters that can occur here.
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


#: Config attributes whose name differs from the setting's own name.
_FIELD_OF = {
    "assembly.quiet_seconds": "quiet_seconds", "model.name": "model_name", "model.dirs": "model_dirs",
    "reference.site": "site_reference", "http.host": "http_host", "http.port": "http_port",
    "metrics.erode_fat": "erode_fat", "metrics.cluster_method": "cluster_method",
    "metrics.assume_levels": "assume_levels",
}


def to_toml(config: Config) -> str:
    """Write the effective configuration as TOML, each setting commented with its source."""
    lines: list[str] = []
    sections: dict[str, dict[str, Any]] = {}
    for key in _SCALARS:
        section, name = key.split(".", 1)
        if section == "rules":
            continue
        if section == "tls":
            value = getattr(config.tls, name)
            sections.setdefault(section, {})[name] = "" if value is None else value
            continue
        value = getattr(config, _FIELD_OF.get(key, name))
        sections.setdefault(section, {})[name] = "" if value is None else value
    sections["rules"] = dataclasses.asdict(config.rules)
    for section, body in sections.items():
        lines.append(f"[{section}]")
        for key, value in body.items():
            source = config.sources.get(f"{section}.{key}", "default")
            lines.append(f"{key} = {_toml_value(value)}  # {source}")
        lines.append("")
    for name, items in (("peers", config.peers), ("destinations", config.destinations)):
        if not items:
            lines.append(f"# no {name}  # {config.sources.get(name, 'default')}")
            lines.append("")
        for item in items:
            lines.append(f"[[{name}]]  # {config.sources.get(name, 'default')}")
            for key, value in dataclasses.asdict(item).items():
                if value is not None:
                    lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)
