"""The ``musclenode`` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
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
            ("SELECTED " if decision["selected"] else "skipped: ") + decision["reason"])
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
        by_destination: dict[str, list[dict]] = {}
        for delivery in job["deliveries"]:
            by_destination.setdefault(delivery["destination"], []).append(delivery)
        for destination, deliveries in by_destination.items():
            sent = sum(d["state"] == "sent" for d in deliveries)
            errors = {d["last_error"] for d in deliveries if d["state"] != "sent" and d["last_error"]}
            print(f"      to {destination}: {sent} of {len(deliveries)} acknowledged"
                  + (f" (last error: {'; '.join(sorted(errors))})" if errors else ""))
    return 0


def _process(args: argparse.Namespace) -> int:
    from pathlib import Path

    from inference.registry import load_model
    from inference.runtime import Segmenter

    from .orchestration.offline import process
    from .service import setup_logging

    config = _load(args)
    setup_logging("WARNING")
    card = load_model(args.model or config.model_name, config.model_dirs)
    segmenter = Segmenter(card, providers=config.device, threads=config.threads or None)
    summary = process([Path(p) for p in args.paths], Path(args.out), config, segmenter)
    for line in summary.skipped or []:
        print(f"skipped {line}")
    print(f"{summary.files} files ({summary.not_dicom} not DICOM), {summary.groups} selected groups:"
          f" {summary.done} done, {summary.failed} failed; results and cohort.csv in {args.out}")
    return 1 if summary.failed else 0


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
    """Muscles with their sides, e.g. ``multifidus L/R, erector spinae L/R``."""
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
        print(json.dumps([{"name": c.name, "version": c.version, "default": c.name == default,
                           "contrasts": c.contrasts, "labels": _label_summary(c),
                           "accuracy": accuracy_summary(c), "card": str(c.path)} for c in scan.cards], indent=2))
        return 0
    if not scan.cards:
        print("no models found")
        return 1
    rows = [("", "name", "version", "contrasts", "labels", "accuracy")]
    rows += [("*" if c.name == default else "", c.name, c.version, ",".join(c.contrasts), _label_summary(c),
              accuracy_summary(c)) for c in scan.cards]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(" ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " " + row[-1])
    print(f"(* default model, {default})")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from inference.card import CardError, file_sha256
    from inference.registry import accuracy_summary, default_model_name, load_model

    try:
        card = load_model(args.name, args.dir or (), verify=False)
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
        f"  card           {card.path}",
        f"  model          {onnx.name}, {onnx.stat().st_size / 1e6:.1f} MB, sha256 {card.sha256[:16]}... {intact}",
        f"  licence        {card.licence or '-'}",
        f"  contrasts      {', '.join(card.contrasts)} ({card.channels} channel{'s' if card.channels > 1 else ''})",
        f"  array axes     rows towards {card.array_axes[0]}, columns towards {card.array_axes[1]}",
        f"  spacing        {card.spacing_mm[0]} x {card.spacing_mm[1]} mm",
        f"  normalisation  {json.dumps(card.normalisation)}",
        f"  windows        {card.window[0]} x {card.window[1]}, overlap {card.overlap}, {card.blend} blending{sigma}",
        f"  post-process   largest component {'yes' if card.largest_component else 'no'},"
        f" crop foreground {'yes' if card.crop_foreground else 'no'}",
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
    status.add_argument("--jobs", type=int, default=20, help="how many recent jobs to list")
    status.set_defaults(run=_status)

    process = commands.add_parser("process", help="process folders of DICOM files offline (research cohorts)")
    process.add_argument("paths", nargs="+", help="files or folders of DICOM files")
    process.add_argument("--out", required=True, help="folder for SEG, SR, summary and cohort.csv")
    process.add_argument("--model", help="model name (default: the configured one)")
    process.set_defaults(run=_process)

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
