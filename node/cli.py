"""The ``musclenode`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any, Sequence

from . import __version__
from .config import Config, ConfigError, load_config, settings_table, to_toml

__all__ = ["main"]


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _serve(args: argparse.Namespace) -> int:
    from .service import Node, data_folder_writable, setup_logging

    config = _load(args)
    problem = data_folder_writable(config.data)
    if problem:
        raise ConfigError(f"node.data: {problem} (from {config.sources.get('node.data', 'default')})")
    setup_logging(config.log_level, config.log_format, config.data)
    node = Node(config)
    node.start()

    def stop(signum: int, frame: Any) -> None:
        logging.getLogger("node").info("stopping on signal %d", signum)
        node.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("node").info("musclenode %s listening as %s on %s:%d, data in %s", __version__,
                                   config.ae_title, config.host, config.port, config.data.resolve())
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


def _print_quality(quality: dict | None) -> None:
    """A job's segmentation quality verdict and the images it excluded (at most five named)."""
    if not quality:
        return
    print(f"      quality: {quality['verdict']}" + (f" - {quality['reason']}" if quality.get("reason") else ""))
    for item in quality.get("excluded", [])[:5]:
        print(f"        excluded {item['where']}: {'; '.join(item['problems'])}")
    if len(quality.get("excluded", [])) > 5:
        print(f"        ... and {len(quality['excluded']) - 5} more (musclenode status --json)")


def _status(args: argparse.Namespace) -> int:
    from .operations.state import NodeState

    config = _load(args)
    if not config.index_path.exists():
        print(f"no index at {config.index_path}: the node has not received anything yet")
        return 0
    with NodeState(config) as state:
        report = state.status_report(associations=args.associations, jobs=args.jobs)
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
            "SELECTED " + decision["reason"] if decision["selected"]
            else decision["reason"] if decision.get("role") == "level_reference"  # "level reference: ..."
            else "skipped: " + decision["reason"])
        print(f"  {s['series_uid']}  {s['modality']} {s['description']!r}, {s['instances']} instances,"
              f" {s['state']} (v{s['version']}, last {_when(s['last_received'])})")
        print(f"      {verdict}")
    jobs_line = ", ".join(f"{n} {state}" for state, n in report["job_counts"].items() if n)
    exports_line = ", ".join(f"{n} {state}" for state, n in report["export_counts"].items() if n)
    print(f"\njobs: {jobs_line or 'none'}; result deliveries: {exports_line or 'none'}")
    for job in report["jobs"]:
        roles = ", ".join(sorted(job["series"]))
        print(f"  job {job['id']} {job['kind']} ({roles}): {job['state']}, attempt {job['attempts']},"
              f" queued {_when(job['created'])}" + (f" - {job['reason']}" if job["reason"] else ""))
        _print_set_aside((job.get("result") or {}).get("set_aside") or [])
        _print_quality((job.get("result") or {}).get("quality"))
        if (job.get("result") or {}).get("not_sent"):
            print(f"      results kept, not sent: {job['result']['not_sent']}")
        by_destination: dict[str, list[dict]] = {}
        for delivery in job["deliveries"]:
            by_destination.setdefault(delivery["destination"], []).append(delivery)
        for destination, deliveries in by_destination.items():
            sent = sum(d["state"] == "sent" for d in deliveries)
            errors = {d["last_error"] for d in deliveries if d["state"] != "sent" and d["last_error"]}
            print(f"      to {destination}: {sent} of {len(deliveries)} acknowledged"
                  + (f" (last error: {'; '.join(sorted(errors))})" if errors else ""))
    return 0


def _resources(text: str | None) -> dict[str, float] | None:
    """``GPU=1,MEMORY=8e9`` -> ``{"GPU": 1.0, "MEMORY": 8e9}``."""
    if not text:
        return None
    resources = {}
    for part in text.split(","):
        name, _, amount = part.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            raise ConfigError(f"--resources: {part!r} is not NAME=AMOUNT") from None
    return resources


def _print_set_aside(records: list[dict]) -> None:
    """The images a job set aside: the counts by kind, then each with its reason (at most 10)."""
    from inference.set_aside import SetAside, describe_counts

    if not records:
        return
    items = [SetAside.from_dict(record) for record in records]
    print(f"      {describe_counts(items)}")
    for item in items[:10]:
        print(f"        series {item.series_instance_uid} {item.describe()}")
    if len(items) > 10:
        print(f"        ... and {len(items) - 10} more (status --json lists every one)")


def _process(args: argparse.Namespace) -> int:
    from pathlib import Path

    from inference.card import CardError
    from inference.registry import load_model

    from .orchestration.cluster import ClusterError, DaskExecutor, InlineExecutor
    from .orchestration.offline import EXIT_CLUSTER, EXIT_CODES, EXIT_USAGE, default_workers, process
    from .orchestration.study_task import ModelSpec
    from .service import setup_logging

    config = _load(args)
    setup_logging("WARNING")
    name = args.model or config.model_name
    try:
        card = load_model(name, config.model_dirs)
    except (CardError, OSError, KeyError, ValueError) as exc:
        print(f"musclenode: model {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    workers = default_workers() if args.workers is None else args.workers
    if workers < 0:
        raise ConfigError("--workers: must be 0 (this process) or more")
    # A local cluster shares this machine's cores among its workers; remote workers run one process
    # per core (dask worker --nworkers N --nthreads 1), so one ONNX Runtime thread each unless told.
    local_share = 1 if args.scheduler else max(1, default_workers() // max(1, workers))
    threads = args.threads or config.threads or local_share
    # The exact version resolved here, so that every worker loads the same card.
    model = ModelSpec(f"{card.name}@{card.version}", tuple(str(d) for d in config.model_dirs), config.device, threads)
    resources = _resources(args.resources)
    executor = (InlineExecutor() if workers == 0 and not args.scheduler
                else DaskExecutor(model, scheduler=args.scheduler, workers=workers))
    out = Path(args.out)
    try:
        with executor:
            summary = process([Path(p) for p in args.paths], out, config, model, f"{card.name} {card.version}",
                              executor, resources=resources)
    except ClusterError as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return EXIT_CLUSTER
    for record in summary.records:
        for problem in record.get("problems", []):
            if problem["outcome"] in ("failed", "not measured"):
                print(f"{problem['outcome']} {problem['study']} {problem['description'] or problem['series']}:"
                      f" {problem['reason']}")
    print(f"{summary.files} files ({summary.not_dicom} not DICOM) in {summary.studies} "
          f"{'study' if summary.studies == 1 else 'studies'}:"
          f" {summary.done} done ({summary.resumed} by an earlier run), {summary.failed} failed,"
          f" {summary.nothing_selected} with nothing selected; {summary.groups - summary.groups_failed} of"
          f" {summary.groups} selected groups processed ({summary.groups_not_measured} not measured: their"
          f" segmentation failed quality control), {summary.skipped_series} series skipped")
    print(f"SEG, SR and summary per study; cohort, slices, studies and skipped_and_failed tables (CSV, Parquet); "
          f"process.log: in {out}")
    if summary.exit_code:
        print(f"exit status {summary.exit_code}: {EXIT_CODES[summary.exit_code]}")
    return summary.exit_code


def _pacs(config: Config, name: str | None):
    """The configured archive called ``name``, or the only one; ConfigError otherwise."""
    if name is not None:
        found = next((p for p in config.pacs if p.name == name), None)
        if found is None:
            names = ", ".join(p.name for p in config.pacs) or "none configured"
            raise ConfigError(f"pacs: no archive named {name!r} (configured: {names})")
        return found
    if len(config.pacs) != 1:
        raise ConfigError("pacs: configure one [[pacs]] archive, or name one with --pacs"
                          f" ({len(config.pacs)} configured)")
    return config.pacs[0]


def _cohort_query(args: argparse.Namespace) -> int:
    from .cohort.filters import CohortFilter, parse_date
    from .cohort.manifest import write_manifest
    from .cohort.query import query_cohort
    from .network.query_retrieve import QueryRetrieveError, QueryRetrieveSCU
    from .operations.progress import ProgressBar

    config = _load(args)
    archive = _pacs(config, args.pacs)
    try:
        cohort = CohortFilter(
            date_from=parse_date(args.date_from) if args.date_from else None,
            date_to=parse_date(args.date_to) if args.date_to else None,
            modalities=tuple(m.upper() for m in args.modality or ()),
            body_parts=tuple(args.body_part or ()),
            study_description=args.study_description, series_description=args.series_description,
            age_min=args.age_min, age_max=args.age_max, sexes=tuple(s.upper() for s in args.sex or ()),
        )
    except ValueError as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 2
    scu = QueryRetrieveSCU(archive.ae_title, archive.host, archive.port, config.ae_title, timeout=args.timeout)
    bars: list[ProgressBar] = []

    def progress(done: int, total: int) -> None:
        if not bars:  # the number of studies is known once the archive has answered
            bars.append(ProgressBar(f"series of the studies in {archive.name}", total))
        bars[0].advance()

    try:
        rows = query_cohort(scu, cohort, progress)
    except QueryRetrieveError as exc:
        print(f"musclenode: query of {archive.name} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for bar in bars:
            bar.close()
    count = write_manifest(args.out, rows)
    series = sum(len(r.series_uids) for r in rows)
    print(f"{count} matching studies ({series} matching series) from {archive.name}; manifest in {args.out}")
    return 0


def _cohort_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cohort.fetch import DicomWebRoute, GetRoute, MoveRoute, fetch_cohort, summarise
    from .cohort.manifest import ManifestError, read_manifest
    from .cohort.targets import FolderTarget, NodeStoreTarget
    from .network.dicomweb import DicomWebSource
    from .network.query_retrieve import QueryRetrieveSCU
    from .operations.progress import ProgressBar

    config = _load(args)
    archive = _pacs(config, args.pacs)
    via = args.via or archive.retrieve
    try:
        rows = read_manifest(args.manifest)
    except ManifestError as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 2
    if args.whole_studies:
        rows = [dataclasses.replace(r, series_uids=()) for r in rows]
    scu = QueryRetrieveSCU(archive.ae_title, archive.host, archive.port, config.ae_title, timeout=args.timeout)
    if via == "move":
        if args.out:
            print("musclenode: --out is for C-GET and DICOMweb; C-MOVE delivers into the node's store"
                  f" ({config.data})", file=sys.stderr)
            return 2
        problem = _echo_self(config)
        if problem is not None:
            print(f"musclenode: C-MOVE delivers to this node ({config.ae_title} on port {config.port}), which does"
                  f" not answer: {problem}. Start it first (musclenode serve, same configuration).",
                  file=sys.stderr)
            return 1
        target = NodeStoreTarget(config.index_path)
        route = MoveRoute(scu, config.ae_title, target)
        where = f"the node's store ({config.data / 'studies'})"
    else:
        if not args.out:
            print(f"musclenode: --out FOLDER is needed to fetch by {'C-GET' if via == 'get' else 'DICOMweb'}",
                  file=sys.stderr)
            return 2
        target = FolderTarget(Path(args.out))
        if via == "get":
            route = GetRoute(scu, target)
        else:
            if archive.dicomweb is None:
                raise ConfigError(f"pacs {archive.name}: no dicomweb URL configured for --via dicomweb")
            route = DicomWebRoute(DicomWebSource(archive.dicomweb, timeout=args.timeout), target)
        where = str(Path(args.out))
    try:
        with ProgressBar(f"fetching from {archive.name} by {via}", len(rows), ("fetched", "present", "failed")) as bar:
            outcomes = fetch_cohort(rows, route, scu, concurrency=args.concurrency, attempts=args.attempts,
                                    backoff=args.backoff, progress=bar)
    finally:
        if isinstance(target, NodeStoreTarget):
            target.close()
    totals = summarise(outcomes)
    for outcome in outcomes:
        if outcome.error is not None:
            print(f"failed {outcome.key}: {outcome.error} (after {outcome.attempts} attempts)")
    print(f"{totals['complete']} of {totals['studies']} studies complete, {totals['failed']} failed;"
          f" {totals['fetched']} instances fetched, {totals['already']} were already there; in {where}")
    return 1 if totals["failed"] else 0


def _echo_self(config: Config) -> str | None:
    """None when this node answers C-ECHO on its port, else why not."""
    from pynetdicom import AE

    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    ae = AE(ae_title=config.ae_title)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate(host, config.port, ae_title=config.ae_title)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "no association"
    status = assoc.send_c_echo()
    assoc.release()
    return None if status and status.Status == 0 else "C-ECHO failed"


def _retry(args: argparse.Namespace) -> int:
    from .operations.state import NodeState

    with NodeState(_load(args)) as state:
        try:
            job = state.retry_job(args.job)
        except (KeyError, ValueError) as exc:
            print(f"musclenode: {exc.args[0]}", file=sys.stderr)
            return 1
    print(f"job {job.id} queued again; a running node picks it up within seconds")
    return 0


def _resend(args: argparse.Namespace) -> int:
    from .operations.state import NodeState

    with NodeState(_load(args)) as state:
        try:
            count, destination = state.resend(args.job, args.destination)
        except (KeyError, ValueError) as exc:
            print(f"musclenode: {exc.args[0]}", file=sys.stderr)
            return 1
    print(f"{count} results of job {args.job} queued for {destination.name}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    # Password hashes are printed as they are, so that the output stays a valid configuration
    # (the dashboard's configuration page hides them).
    print(to_toml(_load(args)))
    return 0


def _config_settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def _dashboard_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from .dashboard.access import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("musclenode: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        print(hash_password(password))
    except ValueError as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 1
    return 0


def _label_summary(card: Any) -> str:
    """Muscles with their sides, e.g. ``multifidus L/R, erector spinae L/R``; for a level model
    the vertebral bodies, e.g. ``bodies T11-L5``."""
    if card.kind != "muscles":
        names = [card.labels[v].vertebra.value for v in card.output_labels if v in card.labels]
        return f"bodies {names[0]}-{names[-1]}" if names else "-"
    sides: dict[str, list[str]] = {}
    for value in card.output_labels:
        info = card.labels.get(value)
        if info is not None:
            sides.setdefault(info.muscle.words, []).append(info.side.letter)
    return ", ".join(f"{muscle} {'/'.join(sorted(s))}" for muscle, s in sides.items())


def _models_list(args: argparse.Namespace) -> int:
    from inference.registry import accuracy_summary, default_model_name, scan_models

    scan = scan_models(args.dir or ())
    for problem in scan.problems:
        print(f"warning: {problem}", file=sys.stderr)
    default = default_model_name()
    if args.json:
        print(json.dumps([{"name": c.name, "version": c.version, "kind": c.kind,
                           "default": c.name == default and scan.selected(c),
                           "selected_by_name": scan.selected(c), "select": f"{c.name}@{c.version}",
                           "contrasts": c.contrasts, "labels": _label_summary(c),
                           "accuracy": accuracy_summary(c), "card": str(c.path)} for c in scan.versions], indent=2))
        return 0
    if not scan.versions:
        print("no models found")
        return 1
    rows = [("", "name", "version", "kind", "contrasts", "labels", "accuracy")]
    rows += [("*" if c.name == default and scan.selected(c) else "", c.name, c.version, c.kind, ",".join(c.contrasts),
              _label_summary(c), accuracy_summary(c) + ("" if scan.selected(c) else f" (select as {c.name}@{c.version})"))
             for c in scan.versions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(" ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " " + row[-1])
    print(f"(* default muscle model, {default}; a plain name selects the version without '(select as ...)';"
          " kind vertebrae: the level model of musclenode levels, never used to segment muscles)")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from inference.card import CardError, file_sha256
    from inference.registry import accuracy_summary, default_model_name, load_model

    try:
        card = load_model(args.name, args.dir or (), verify=False, kind=None)
    except CardError as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    onnx = card.onnx_path
    intact = "matches the card" if file_sha256(onnx) == card.sha256 else "DOES NOT MATCH the card"
    sigma = f" (sigma {card.sigma_scale} x window)" if card.blend == "gaussian" else ""
    lines = [
        f"{card.name} {card.version}" + ("  (default model)" if card.name == default_model_name() else ""),
        f"  kind           {card.kind}",
        f"  card           {card.path}",
        f"  model          {onnx.name}, {onnx.stat().st_size / 1e6:.1f} MB, sha256 {card.sha256[:16]}... {intact}",
        f"  licence        {card.licence or '-'}",
        f"  contrasts      {', '.join(card.contrasts)} ({card.channels} channel{'s' if card.channels > 1 else ''})",
        f"  array axes     rows towards {card.array_axes[0]}, columns towards {card.array_axes[1]}",
        f"  spacing        {card.spacing_mm[0]} x {card.spacing_mm[1]} mm",
        f"  normalisation  {json.dumps(card.normalisation)}",
        (f"  windows        {card.window[0]} x {card.window[1]}, overlap {card.overlap}, {card.blend} blending{sigma}"
         if card.kind == "muscles" else
         f"  windows        the whole slice at once, at least {card.window[0]} x {card.window[1]}"),
        (f"  post-process   largest component {'yes' if card.largest_component else 'no'},"
         f" crop foreground {'yes' if card.crop_foreground else 'no'}" if card.kind == "muscles" else
         f"  post-process   {json.dumps({k: v for k, v in card.postprocess.items() if k != 'calibration'})}"),
        "  labels         " + "; ".join(
            f"{v} {card.labels[v].name}" if v in card.labels else f"{v} (not described)" for v in card.output_labels),
        f"  accuracy       {accuracy_summary(card)}",
    ]
    for title, value in (("provenance", card.provenance), ("training", card.training),
                         ("accuracy in full", card.accuracy)):
        if value:
            lines.append(f"  {title}:")
            lines += ["    " + line for line in json.dumps(value, indent=2).splitlines()]
    print("\n".join(lines))
    return 0


def _models_import_musclemap(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:  # torch and MONAI are the train extra: imported here only
        from inference.musclemap import ImportErrorMM, import_checkpoint
        import torch  # noqa: F401
        import monai  # noqa: F401
    except ImportError as exc:
        print(f"musclenode: importing a MuscleMap checkpoint needs torch and MONAI (pip install"
              f" 'musclenode[train]'): {exc}", file=sys.stderr)
        return 1
    from inference.card import CardError

    for path in (args.checkpoint, args.config):
        if not Path(path).is_file():
            print(f"musclenode: {path} does not exist", file=sys.stderr)
            return 1
    try:
        card = import_checkpoint(args.checkpoint, args.config, args.out, name=args.name, overlap=args.overlap)
    except (ImportErrorMM, CardError, OSError) as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    print(f"imported {card.name} {card.version}: {card.onnx_path.name} and {card.path.name} in {out}")
    print(f"  labels    {_label_summary(card)}"
          f" ({sum(1 for v in card.output_labels if v == 0)} other classes ignored)")
    print(f"  windows   {card.window[0]} x {card.window[1]}, overlap {card.overlap}"
          f" (MuscleMap's default {card.provenance.get('musclemap_defaults', {}).get('overlap')})")
    print(f"use it: add {out} to model.dirs and set model.name = \"{card.name}\","
          f" or try: musclenode models show {card.name} --dir {out}")
    return 0


def _levels(args: argparse.Namespace) -> int:
    from inference.card import KIND_VERTEBRAE, CardError
    from inference.registry import DEFAULT_LEVEL_MODEL, load_model

    from .levels import levels_as_rows, study_levels

    name = args.model or DEFAULT_LEVEL_MODEL
    try:
        # The node's model folders too, so that the levels printed are those the pipeline uses.
        card = load_model(name, [*(args.dir or ()), *_load(args).model_dirs], kind=KIND_VERTEBRAE)
    except CardError as exc:
        print(f"musclenode: level model {name}: {exc}", file=sys.stderr)
        return 1
    results = study_levels(args.paths, card)
    if args.json:
        print(json.dumps(levels_as_rows(results), indent=1))
    if not results:
        # The same exit status with --json (which still writes a valid, empty list).
        print("no DICOM images found", file=sys.stderr if args.json else sys.stdout)
        return 1
    if args.json:
        return 0
    for study in results:
        print(f"study {study.study_instance_uid}")
        reference = study.reference
        if reference is None:
            print(f"  no levels: {study.reason}")
        else:
            weighting = study.reference_weighting.upper() or "weighting unknown"
            print(f"  reference: sagittal series {reference.series_instance_uid} "
                  f"{reference.series_description!r} ({weighting}), model {reference.model}")
            found = ", ".join(reference.names) or "none"
            print(f"  bodies found: {found}" + (f"; L5-S1 disc {reference.disc_mm:.0f} mm high (derived)"
                                                if "L5" in reference.names else ""))
            for body in reference.bodies:
                c, s_, i = body.centroid, body.superior, body.inferior
                print(f"    {body.name:4s} centroid ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) superior end plate "
                      f"({s_[0]:.1f}, {s_[1]:.1f}, {s_[2]:.1f}) inferior ({i[0]:.1f}, {i[1]:.1f}, {i[2]:.1f}) mm LPS")
            for problem in reference.problems:
                print(f"  problem: {problem}")
        if not study.series:
            print("  no axial series")
        for levels, frames, description in study.series:
            print(f"  axial series {levels.series_instance_uid} {description!r}: {len(frames)} slices")
            if levels.reason:
                print(f"    no levels: {levels.reason}")
                continue
            for index, ((sop, frame_number), level) in enumerate(zip(frames, levels.levels), 1):
                frame = f" frame {frame_number}" if frame_number > 1 else ""
                print(f"    {index:3d} {sop}{frame}  {level or '-'}")
    return 0


def _dixon_component(series: Any, header: Any) -> str | None:
    """The Dixon component of a series as the selection rules read it (water, fat, in_phase...)."""
    from .orchestration.rules import dixon_role

    def number(value: Any) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    role, _ = dixon_role(tuple(str(v) for v in header.get("ImageType", [])), str(header.get("SeriesDescription", "")),
                         number(header.get("EchoTime")), number(header.get("MagneticFieldStrength")))
    return str(role) if role is not None else None


def _models_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:  # torch and MONAI are the train extra: imported here only
        import monai  # noqa: F401
        import torch  # noqa: F401

        from inference.training.finetune import FinetuneError, finetune
    except ImportError as exc:
        print(f"musclenode: fine-tuning needs torch and MONAI (pip install 'musclenode[train]'): {exc}",
              file=sys.stderr)
        return 1
    from inference.card import CardError
    from inference.registry import load_model, scan_models

    config = _load(args)
    dirs = [*(args.dir or ()), *config.model_dirs]
    out = args.out or (str(config.model_dirs[0]) if config.model_dirs else None)
    if out is None:
        print("musclenode: where should the new model go? Pass --out DIR, or set model.dirs (the registry's"
              " folders) and it goes into the first", file=sys.stderr)
        return 2
    name = args.model or config.model_name
    try:
        base = load_model(name, dirs)
    except CardError as exc:
        print(f"musclenode: model {name}: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    argv = " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    try:
        card = finetune(base, [Path(p) for p in args.from_seg], out, _dixon_component, version=args.version,
                        existing=scan_models([*dirs, out]).versions, epochs=args.epochs,
                        samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, holdout_fraction=args.holdout_fraction, seed=args.seed,
                        threads=args.threads, time_limit_min=args.time_limit_min, software_version=__version__,
                        command=f"musclenode {argv}".strip())
    except (FinetuneError, CardError, OSError) as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 1
    data = card.provenance["data"]
    split = card.training["split"]
    print(f"fine-tuned {card.name} {card.version} from {base.version} on {data['seg_instances']} SEG(s) of "
          f"{data['source_series']} series, {data['patients']} patient(s): {card.path}")
    print(f"  held out: {split['note']}")
    for contrast, groups in card.accuracy["dice"].items():
        for group, scores in groups.items():
            before = card.accuracy["base_model_dice"].get(contrast, {}).get(group, {})
            cells = ", ".join(f"{card.labels[int(v)].name} {d:.3f} (base {before.get(v, float('nan')):.3f})"
                              for v, d in scores.items())
            print(f"  Dice {contrast:8} {cells}")
    folder = Path(out).resolve()
    listed = any(Path(d).expanduser().resolve() == folder for d in config.model_dirs)
    print(f"use it: model.name = \"{card.name}@{card.version}\"" + ("" if listed else f" with {folder} in model.dirs")
          + f"; a plain \"{card.name}\" selects the first folder's highest version (musclenode models list)")
    return 0


def _reference_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reports.centiles import save_site_reference
    from reports.reference_fit import CohortError, describe, fit_site_reference, read_cohort

    try:
        import statsmodels  # noqa: F401
    except ImportError:
        print("musclenode: fitting a site reference needs statsmodels: pip install 'musclenode[reference]'",
              file=sys.stderr)
        return 1

    try:
        observations, skipped = read_cohort(args.cohort)
    except (OSError, CohortError) as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 1
    report = fit_site_reference(observations, args.name or Path(args.out).stem, args.version, skipped_rows=skipped,
                                batch=args.site_term, share_held_out=args.held_out, age_df=args.age_df,
                                cohort_file=args.cohort)
    if not report.reference.models:
        print(f"musclenode: no model could be fitted from {args.cohort}", file=sys.stderr)
        for line in describe(report):
            print(line, file=sys.stderr)
        return 1
    save_site_reference(report.reference, args.out)
    for line in describe(report):
        print(line)
    print(f"saved to {args.out}")
    return 0


def _load_site(path: str, site: str | None = None):
    from reports.centiles import ModelFileError, load_site_reference

    try:
        return load_site_reference(path, site)
    except (OSError, ModelFileError) as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return None


def _reference_show(args: argparse.Namespace) -> int:
    from reports.reference import published_table

    if args.site:
        site = _load_site(args.site)
        if site is None:
            return 1
        cohort = site.cohort
        print(f"site reference {site.title}: {len(site.models)} models from {cohort.get('people')} people, "
              f"ages {cohort.get('age')}, BMI {cohort.get('bmi')}, sites {cohort.get('sites') or '-'}, "
              f"scanners {cohort.get('scanners') or '-'}, site term {cohort.get('site_term') or 'none'}")
        for m in site.models:
            c = m.calibration
            calibration = ("not assessed" if c.get("calibrated") is None else
                           f"held-out {c['people']} people: mean z {c['mean_z']:+.2f}, SD {c['sd_z']:.2f}, "
                           f"{100 * c['inside_5_95']:.1f} % inside P5-P95"
                           + ("" if c["calibrated"] else " (MISCALIBRATED)"))
            print(f"  {m.label}: n {m.n} ({m.n_subjects} people), ages {m.age_range[0]:.1f}-{m.age_range[1]:.1f}, "
                  f"BMI {m.bmi_range[0]:.1f}-{m.bmi_range[1]:.1f}, sexes {'+'.join(m.sexes)}, age df "
                  f"{m.fit.get('age_df')}, skewness {m.epsilon:+.2f}, tail weight {math.exp(m.log_delta):.2f};"
                  f" {calibration}")
        for problem in site.skipped:
            print(f"  not fitted: {problem}")
        return 0
    table = published_table()
    print(f"published reference {table.version}: {len(table.rows)} groups")
    for r in table.rows:
        print(f"  {r.method} {r.muscle} {r.measurement} {r.levels} sex {r.sex} {r.age_band()}"
              f"{' (band)' if r.age_specific else ''}: {r.mean:g} +/- {r.sd:g}, n {r.n or '?'} [{r.source}]")
    print("sources:")
    for source, citation in table.citations.items():
        print(f"  {source}: {citation} {table.links.get(source, '')}")
    return 0


def _reference_z(args: argparse.Namespace) -> int:
    import json

    from inference.patient import MissingValue, PatientContext
    from inference.vocabulary import ReferenceMethod
    from reports.reference import ReferenceTableError, Z_BANDS, compare, level_key, muscle_key

    site = _load_site(args.model, args.site)
    if site is None:
        return 1
    try:
        muscle = muscle_key(args.muscle)
        levels = level_key(args.level) if args.level else None
        method = ReferenceMethod.of(args.method)
        if method is None:
            raise ReferenceTableError(f"method {args.method!r} is not a reference or fat method")
        if site.find(method, muscle, args.measurement, levels) is None:
            raise ReferenceTableError(f"site reference {site.title} has no {method} {muscle} {args.measurement} model"
                                      + (f" over {levels}" if levels else ""))
        given = "BMI given on the command line"
        patient = PatientContext(age_years=args.age, sex=args.sex.upper(), bmi=args.bmi, age_source="command line",
                                 missing=(MissingValue("height_m", given), MissingValue("weight_kg", given)))
        comparison = compare(args.value, method=method, muscle=muscle, measurement=args.measurement, levels=levels,
                             patient=patient, site=site)
    except (ReferenceTableError, ValueError) as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 2
    stratum = comparison.stratum
    result = {"model": site.title, "method": str(method), "muscle": muscle, "measurement": args.measurement,
              "levels": levels, "site": site.site, "value": args.value, "age": args.age, "sex": args.sex.upper(),
              "bmi": args.bmi, "z": comparison.z, "centile": comparison.percentile,
              "reason": comparison.reason, "notes": list(comparison.notes)}
    if stratum is not None:
        result.update(median=stratum.at(0.0), p5=stratum.at(Z_BANDS[1]), p95=stratum.at(Z_BANDS[5]),
                      reference=stratum.description)
    print(json.dumps(result, indent=1))
    return 0


def _reference_calibrate(args: argparse.Namespace) -> int:
    from reports.reference_fit import CohortError, calibrate, read_cohort

    site = _load_site(args.model)
    if site is None:
        return 1
    try:
        observations, _ = read_cohort(args.cohort)
    except (OSError, CohortError) as exc:
        print(f"musclenode: {exc}", file=sys.stderr)
        return 1
    term = site.cohort.get("site_term")
    failed = False
    print(f"site reference {site.title} against {args.cohort}")
    for model in site.models:
        report = calibrate(model, observations, term)
        if report["calibrated"] is None:
            print(f"  {model.label}: {'; '.join(report['problems'])}")
            continue
        failed |= not report["calibrated"]
        print(f"  {model.label}: {report['people']} people: mean z {report['mean_z']:+.2f}, SD {report['sd_z']:.2f}, "
              f"{100 * report['inside_5_95']:.1f} % inside P5-P95"
              + ("" if report["calibrated"] else " MISCALIBRATED: " + "; ".join(report["problems"])))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musclenode", description=(
        "A DICOM node that segments the lumbar paraspinal muscles on MRI and measures their cross-sectional "
        "area, volume and fat per vertebral level; results go back as DICOM SEG, a TID 1500 SR and summary "
        "pages."))
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
    status.add_argument("--jobs", type=int, default=20, help="how many recent jobs to list")
    status.set_defaults(run=_status)

    process = commands.add_parser("process", help="process folders of DICOM files offline (research cohorts)")
    process.add_argument("paths", nargs="+", help="files or folders of DICOM files")
    process.add_argument("--out", required=True, help="folder for SEG, SR, summary and cohort.csv")
    process.add_argument("--model", help="model name (default: the configured one)")
    process.add_argument("--scheduler", help="address of an existing Dask scheduler, tcp://HOST:PORT"
                         " (default: a local cluster)")
    process.add_argument("--workers", type=int, help="local worker processes (default: one per core;"
                         " 0 runs everything in this process)")
    process.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (default: jobs.threads,"
                         " else cores / workers, or 1 with --scheduler)")
    process.add_argument("--resources", help="Dask resources each study needs, e.g. GPU=1 (workers started"
                         " with --resources GPU=1)")
    process.set_defaults(run=_process)

    cohort = commands.add_parser("cohort", help="research cohorts from an archive: query, then fetch")
    cohort_commands = cohort.add_subparsers(dest="cohort_command", required=True)
    query = cohort_commands.add_parser("query", help="C-FIND the configured archive; write the matching studies as a manifest")
    query.add_argument("--out", required=True, help="manifest CSV to write")
    query.add_argument("--pacs", help="which [[pacs]] archive (default: the only one)")
    query.add_argument("--from", dest="date_from", help="first study date, YYYY-MM-DD")
    query.add_argument("--to", dest="date_to", help="last study date, YYYY-MM-DD")
    query.add_argument("--modality", action="append", help="series modality, e.g. MR (repeatable: any of them)")
    query.add_argument("--body-part", action="append", help="series BodyPartExamined, e.g. LSPINE (repeatable)")
    query.add_argument("--study-description", help="regular expression searched in StudyDescription, ignoring case")
    query.add_argument("--series-description", help="regular expression searched in SeriesDescription, ignoring case")
    query.add_argument("--age-min", type=int, help="youngest age at the study, completed years")
    query.add_argument("--age-max", type=int, help="oldest age at the study, completed years")
    query.add_argument("--sex", action="append", choices=["M", "F", "O", "m", "f", "o"], help="PatientSex (repeatable)")
    query.add_argument("--timeout", type=float, default=60, help="seconds per network operation (default 60)")
    query.set_defaults(run=_cohort_query)
    fetch = cohort_commands.add_parser("fetch", help="retrieve every study of a manifest; run again to resume")
    fetch.add_argument("manifest", help="CSV from cohort query, or written by hand with a study_uid or accession column")
    fetch.add_argument("--pacs", help="which [[pacs]] archive (default: the only one)")
    fetch.add_argument("--via", choices=["move", "get", "dicomweb"],
                       help="C-MOVE into this node's store, C-GET or DICOMweb into --out (default: the archive's retrieve)")
    fetch.add_argument("--out", help="folder for C-GET and DICOMweb: OUT/STUDY/SERIES/SOP.dcm")
    fetch.add_argument("--whole-studies", action="store_true", help="every series, not only the manifest's matching ones")
    fetch.add_argument("--concurrency", type=int, default=4, help="studies fetched at the same time (default 4)")
    fetch.add_argument("--attempts", type=int, default=3, help="tries per study before it counts as failed (default 3)")
    fetch.add_argument("--backoff", type=float, default=2.0, help="seconds before the second try, doubling (default 2)")
    fetch.add_argument("--timeout", type=float, default=60, help="seconds per network operation (default 60)")
    fetch.set_defaults(run=_cohort_fetch)

    retry = commands.add_parser("retry", help="run a failed or finished job again")
    retry.add_argument("job", type=int)
    retry.set_defaults(run=_retry)

    resend = commands.add_parser("resend", help="send a job's results to a destination again")
    resend.add_argument("job", type=int)
    resend.add_argument("destination", help="a configured destination's name, or AE@host:port")
    resend.set_defaults(run=_resend)

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the effective configuration and where each value came from")
    show.set_defaults(run=_config_show)
    settings = config_commands.add_parser(
        "settings", help="every setting with its default, environment variable and meaning (Markdown)")
    settings.set_defaults(run=_config_settings)

    dashboard = commands.add_parser("dashboard", help="the web dashboard")
    dashboard_commands = dashboard.add_subparsers(dest="dashboard_command", required=True)
    hash_password = dashboard_commands.add_parser(
        "hash-password", help="print the argon2 hash of a password for [[dashboard.users]] password_hash"
        " (asks twice on a terminal; else reads one line from standard input)")
    hash_password.set_defaults(run=_dashboard_hash_password)

    models = commands.add_parser("models", help="segmentation models: bundled and in extra folders")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    folder_help = "also search this folder of model cards, before the bundled models (repeatable)"
    models_list = models_commands.add_parser("list", help="name, version, contrasts, labels and accuracy of each model")
    models_list.add_argument("--dir", action="append", help=folder_help)
    models_list.add_argument("--json", action="store_true", help="machine-readable output")
    models_list.set_defaults(run=_models_list)
    models_show = models_commands.add_parser("show", help="the whole model card of one model")
    models_show.add_argument("name", help="model name, as models list shows it")
    models_show.add_argument("--dir", action="append", help=folder_help)
    models_show.add_argument("--json", action="store_true", help="the card as JSON")
    models_show.set_defaults(run=_models_show)
    models_import = models_commands.add_parser(
        "import-musclemap", help="turn a published MuscleMap checkpoint (.pth and its .json) into an ONNX model and card")
    models_import.add_argument("checkpoint", metavar="MODEL.pth", help="MuscleMap checkpoint (the UNet's state_dict)")
    models_import.add_argument("config", metavar="MODEL.json", help="its MuscleMap model configuration")
    models_import.add_argument("--out", default=".", help="folder to write NAME.onnx and NAME.json into (default: .)")
    models_import.add_argument("--name", help="model name (default: musclemap- and the configuration's file name)")
    models_import.add_argument("--overlap", type=float, default=0.5,
                               help="sliding-window overlap written into the card (default 0.5; MuscleMap's own is 0.9)")
    models_import.set_defaults(run=_models_import_musclemap)

    models_train = models_commands.add_parser(
        "train", help="fine-tune the current model on a site's DICOM SEGs (corrected or manual) and their series")
    models_train.add_argument("--from-seg", nargs="+", required=True, metavar="PATH",
                              help="folders or files holding SEG objects and their source series")
    models_train.add_argument("--model", help="the model to start from (default: model.name), NAME or NAME@VERSION")
    models_train.add_argument("--dir", action="append", help=folder_help)
    models_train.add_argument("--out", help="folder for the new model (default: the first of model.dirs)")
    models_train.add_argument("--version", help="version of the new model (default: the base's +site.N)")
    models_train.add_argument("--epochs", type=int, default=10)
    models_train.add_argument("--samples-per-epoch", type=int, default=128, help="augmented windows per epoch")
    models_train.add_argument("--batch-size", type=int, default=8)
    models_train.add_argument("--learning-rate", type=float, default=2e-4)
    models_train.add_argument("--holdout-fraction", type=float, default=0.2,
                              help="share of patients held out (with one patient: of each series' slices)")
    models_train.add_argument("--seed", type=int, default=20240612)
    models_train.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    models_train.add_argument("--time-limit-min", type=float, help="stop (annealed) after this many minutes")
    models_train.set_defaults(run=_models_train, command_line=None)

    levels = commands.add_parser(
        "levels", help="vertebral level of every axial slice, from the study's sagittal series (level model)")
    levels.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (one or more studies)")
    levels.add_argument("--json", action="store_true",
                        help="one object per axial slice: its UIDs, level (or null), the reason for none, and the "
                             "reference's bodies_found and reference_problems")
    levels.add_argument("--model", help="level model, NAME or NAME@VERSION (default: musclenode-lumbar-vertebrae)")
    levels.add_argument("--dir", action="append", help=folder_help)
    levels.set_defaults(run=_levels)

    reference = commands.add_parser("reference", help="the reference standard: published table and site references")
    reference_commands = reference.add_subparsers(dest="reference_command", required=True)
    fit = reference_commands.add_parser("fit", help="fit a site reference (centile curves) from a control cohort CSV")
    fit.add_argument("cohort", help="CSV: patient_id (or study), muscle, side, level (optional), age, sex, bmi,"
                     " fat_fraction_percent (or fat_percent) and/or csa_mm2 (or mean_csa_mm2), method (or fat_method),"
                     " site and scanner (optional); the cohort.csv of musclenode process is one")
    fit.add_argument("--out", required=True, help="where to write the site reference (JSON)")
    fit.add_argument("--name", help="name reported with every z-score (default: the file name)")
    fit.add_argument("--version", default="1", help="version reported with every z-score (default 1)")
    fit.add_argument("--site-term", choices=("auto", "site", "scanner", "none"), default="auto",
                     help="what the site term uses (default: site when the cohort has several, else scanner)")
    fit.add_argument("--held-out", type=float, default=0.2,
                     help="share of the people held out for the calibration report (default 0.2)")
    fit.add_argument("--age-df", type=int, choices=(3, 4, 5, 6), help="age spline degrees of freedom (default: by AIC)")
    fit.set_defaults(run=_reference_fit)
    reference_show = reference_commands.add_parser("show", help="print the published table, or a site reference")
    reference_show.add_argument("--site", help="a site reference file written by reference fit")
    reference_show.set_defaults(run=_reference_show)
    reference_z = reference_commands.add_parser("z", help="z-score and centile of one value under a site reference (JSON)")
    reference_z.add_argument("model", help="a site reference file written by reference fit")
    reference_z.add_argument("--muscle", required=True, help="muscle key, e.g. multifidus")
    reference_z.add_argument("--age", type=float, required=True, help="years")
    reference_z.add_argument("--sex", required=True, choices=("F", "M", "f", "m"))
    reference_z.add_argument("--bmi", type=float, required=True, help="kg/m2")
    reference_z.add_argument("--value", type=float, required=True, help="the measurement (fat %% or CSA mm2)")
    reference_z.add_argument("--level", help="vertebral levels, e.g. L4 or L1-L5 (when the model has levels)")
    reference_z.add_argument("--measurement", default="fat_fraction_percent", choices=("fat_fraction_percent", "csa_mm2"))
    reference_z.add_argument("--method", default="dixon_ff", help="reference or fat method (default dixon_ff)")
    reference_z.add_argument("--site", help="the site (or scanner) among the model's; default: their average")
    reference_z.set_defaults(run=_reference_z)
    calibrate = reference_commands.add_parser(
        "calibrate", help="check a site reference against another cohort CSV (exit 1 when miscalibrated)")
    calibrate.add_argument("model", help="a site reference file written by reference fit")
    calibrate.add_argument("cohort", help="a cohort CSV as for fit")
    calibrate.set_defaults(run=_reference_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``musclenode`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"musclenode: configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``musclenode levels --json | head``): stop quietly, as other
        # commands do, with the status of a process killed by SIGPIPE. Pointing stdout at devnull
        # keeps the interpreter's final flush from raising again (Python docs, signal: SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
