"""The ``musclenode`` command."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from datetime import datetime
from typing import Any, Sequence

from . import __version__
from .config import Config, ConfigError, load_config, to_toml

__all__ = ["main"]


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _serve(args: argparse.Namespace) -> int:
    from .service import Node, data_folder_writable, setup_logging

    config = _load(args)
    setup_logging(config.log_level)
    problem = data_folder_writable(config.data)
    if problem:
        raise ConfigError(f"node.data: {problem} (from {config.sources.get('node.data', 'default')})")
    node = Node(config)
    try:
        node.start()
    except OSError as exc:
        raise ConfigError(
            f"node.port: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            f" (from {config.sources.get('node.port', 'default')})"
        ) from None

    def stop(signum: int, frame: Any) -> None:
        logging.getLogger("node").info("stopping on signal %d", signum)
        node.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"musclenode {__version__} listening as {config.ae_title} on {config.host}:{config.port},"
          f" data in {config.data.resolve()}", flush=True)
    node.wait()
    return 0


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE

    config = _load(args)
    host = args.host or ("127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host)
    port = args.port or config.port
    called = args.called or config.ae_title
    ae = AE(ae_title=args.calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = args.timeout
    started = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "no association"
        print(f"echo {called}@{host}:{port}: {why}", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    if not status or status.Status != 0:
        print(f"echo {called}@{host}:{port}: failed", file=sys.stderr)
        return 1
    print(f"echo {called}@{host}:{port}: success in {1000 * (time.perf_counter() - started):.0f} ms")
    return 0


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _status(args: argparse.Namespace) -> int:
    from .index import Index

    config = _load(args)
    if not config.index_path.exists():
        print(f"no index at {config.index_path}: the node has not received anything yet")
        return 0
    index = Index(config.index_path)
    try:
        decisions = index.latest_decisions()
        series = index.all_series()
        report = {
            "data": str(config.data.resolve()),
            "counts": index.counts(),
            "associations": index.associations(limit=args.associations),
            "series": [
                {**s.__dict__, "decision": decisions.get(s.series_uid)} for s in series
            ],
        }
    finally:
        index.close()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    counts = report["counts"]
    print(f"data folder {report['data']}")
    print(f"{counts['instances']} instances in {counts['series']} series ({counts['series_ready']} ready),"
          f" {counts['associations']} associations")
    print("\nrecent associations:")
    for a in report["associations"]:
        print(f"  #{a['id']} {a['calling_ae']}@{a['address']} {_when(a['started'])}"
              f" {a['outcome'] or 'open'}: {a['instances']} stored, {a['failures']} refused")
    print("\nseries:")
    for s in report["series"]:
        decision = s["decision"]
        verdict = "not judged yet" if decision is None else (
            ("SELECTED " if decision["selected"] else "skipped: ") + decision["reason"])
        print(f"  {s['series_uid']}  {s['modality']} {s['description']!r}, {s['instances']} instances,"
              f" {s['state']} (v{s['version']}, last {_when(s['last_received'])})")
        print(f"      {verdict}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    print(to_toml(_load(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musclenode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"musclenode {__version__}")
    parser.add_argument(
        "-c", "--config", help="TOML configuration file (default: $MUSCLENODE_CONFIG, else embedded defaults)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM node")
    serve.set_defaults(run=_serve)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM node (by default this one)")
    echo.add_argument("--host", help="address (default: this node's)")
    echo.add_argument("--port", type=int, help="port (default: this node's)")
    echo.add_argument("--called", help="called AE title (default: this node's)")
    echo.add_argument("--calling", default="ECHOSCU", help="calling AE title (default: ECHOSCU)")
    echo.add_argument("--timeout", type=float, default=10, help="seconds (default: 10)")
    echo.set_defaults(run=_echo)

    status = commands.add_parser("status", help="what was received, and what was decided about each series")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--associations", type=int, default=10, help="how many recent associations to list")
    status.set_defaults(run=_status)

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the effective configuration and where each value came from")
    show.set_defaults(run=_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``musclenode`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"musclenode: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
