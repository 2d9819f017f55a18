"""A real viewer shows the SEG: OHIF in headless Chromium, reading Orthanc over DICOMweb.

The TUM01 water series and the SEG of its manual labels go into a real Orthanc (Debian
``orthanc`` with ``orthanc-dicomweb``). OHIF's built viewer (``npm pack @ohif/app``, its
``dist/``) is served by a small server in this test that also passes ``/dicom-web/`` on to
Orthanc, so that viewer and archive share one origin. ``tests/viewer/view.mjs`` drives Chromium
with ``playwright-core``: the study opens, the SEG's thumbnail is loaded over the MR series, the
segmentation panel lists the segments, and a screenshot is kept in the artefacts folder. The
screenshot is then checked: the segment colours are drawn, in the posterior half, with the
patient's left (the lighter tone of each muscle) on the viewer's right (radiological display).

A second test does the same for a series of two angled slabs processed by the pipeline: one SEG
per slab (reports.seg), both listed in the study browser. OHIF 3.13 shows the SEG of the slab its
stack begins with (part 1: the parts follow the source order), drawn as above. It refuses the
other slab's SEG: its SEG loader (cornerstone's createLabelmapsFromSegImageIds) compares every SEG
frame with the orientation of the referenced series' first image and stops with "Segmentations
oblique to the acquisition plane of the source data are not yet supported" (a SEG with per-frame
orientations stops at the same check, "Individual SEG frames are out of plane"), so no encoding of
the second slab reaches OHIF's display of a two-orientation series; the summary pages do. The
test asserts that refusal, so that it notices when OHIF learns to show it.

A third test loads the SRs of the real Dixon study with its sagittal level reference processed by
the pipeline (``tests/viewer/sr.mjs``): OHIF 3.13.2 stops on the main report (a TypeError on its
groups without coordinates), and lists the key-slice outline document (reports.outline_report) in
its measurement panel, one row per outline; its docstring says why.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

from tests import studies
from tests.peers import REPO, Orthanc, free_port
from tests.validators import missing

VIEWER = REPO / "tests" / "viewer"
INSTALL = "see deploy/test.sh (apt-get install chromium orthanc-dicomweb; npm ci and npm pack @ohif/app in tests/viewer)"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
LABELS = ("multifidus", "erector spinae")


def ohif_dist() -> Path:
    return Path(os.environ.get("MUSCLENODE_OHIF_DIST", VIEWER / "ohif" / "package" / "dist"))


def dicomweb_orthanc(folder: Path) -> Orthanc:
    """Orthanc with its DICOMweb plugin at /dicom-web/ (and WADO-URI at /wado)."""
    return Orthanc(folder, ready_path="/dicom-web/studies", extra_config={
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    })


def same_origin_server(port: int, dist: Path, config: bytes, archive: str) -> http.server.ThreadingHTTPServer:
    """OHIF's dist/ (a single-page app: unknown paths get index.html) plus /dicom-web/ and /wado of Orthanc."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, *args) -> None:
            pass

        def proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
            request = urllib.request.Request(archive + self.path, data=body, method=self.command, headers=headers)
            try:
                response = urllib.request.urlopen(request, timeout=120)
            except urllib.error.HTTPError as error:
                response = error
            data = response.read()
            self.send_response(response.status if hasattr(response, "status") else response.code)
            if response.headers.get("Content-Type"):
                self.send_header("Content-Type", response.headers["Content-Type"])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.startswith(("/dicom-web/", "/wado")):
                return self.proxy()
            path = self.path.split("?")[0]
            if path == "/app-config.js":
                self.send_response(200)
                self.send_header("Content-Type", "application/javascript")
                self.send_header("Content-Length", str(len(config)))
                self.end_headers()
                self.wfile.write(config)
                return
            if not (dist / path.lstrip("/")).is_file():
                self.path = "/index.html"
            return super().do_GET()

        def do_POST(self) -> None:
            self.proxy()

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


def requirements() -> tuple[str, str, Path]:
    chromium = shutil.which("chromium") or os.environ.get("CHROMIUM")
    if not chromium:
        missing("chromium", INSTALL)
    node = shutil.which("node")
    if not node:
        missing("node", INSTALL)
    if not (VIEWER / "node_modules" / "playwright-core").is_dir():
        missing("playwright-core (tests/viewer/node_modules)", INSTALL)
    if not (ohif_dist() / "index.html").is_file():
        missing(f"OHIF's dist/ ({ohif_dist()})", INSTALL)
    if not DICOMWEB_PLUGIN.is_file():
        missing("orthanc-dicomweb", INSTALL)
    return chromium, node, ohif_dist()


def test_ohif_shows_the_seg_over_the_mr_series(tmp_path: Path) -> None:
    chromium, node, dist = requirements()
    from inference.geometry import read_series
    from reports.seg import build_segmentation
    from reports.uids import ResultIdentity
    from tests.test_seg import CARD, SOFTWARE, manual_label_map

    studies.require_data()
    study = studies.write_dixon_study(tmp_path / "study", seed="viewer", contrasts=("water",))
    water = read_series(study.series["water"].files)
    identity = ResultIdentity([water.series_instance_uid], f"{CARD[0]} {CARD[1]}", SOFTWARE)
    seg = build_segmentation(manual_label_map(water), *CARD, identity, SOFTWARE)
    seg.save_as(tmp_path / "seg.dcm")
    ((shot, result),) = show(tmp_path, study.series["water"].files, [tmp_path / "seg.dcm"],
                             str(seg.StudyInstanceUID), "ohif-seg", chromium, node, dist, seg_indices=(0,))
    check_screenshot(shot, viewport(result))


def test_ohif_shows_the_segs_of_two_angled_slabs(tmp_path: Path) -> None:
    chromium, node, dist = requirements()
    from inference.registry import DEFAULT_MODEL, load_model
    from inference.runtime import Segmenter
    from reports.pipeline import WorkItem, run

    studies.require_data()
    study = studies.write_two_slab_study(tmp_path / "study", seed="viewer-slabs", tilts_deg=(12.0, -10.0))
    segmenter = Segmenter(load_model(DEFAULT_MODEL), providers="cpu", threads=2)
    results = run(WorkItem("dixon", {role: info.files for role, info in study.series.items()}), segmenter,
                  software_version="0.1.0")
    assert len(results.segmentations) == 2
    paths = []
    for number, seg in enumerate(results.segmentations, start=1):
        paths.append(tmp_path / f"seg{number}.dcm")
        seg.save_as(paths[-1])
    (shot, first), (_, second) = show(tmp_path, study.series["water"].files, paths, study.study_uid,
                                      "ohif-two-slabs", chromium, node, dist, seg_indices=(0, 1))
    assert "SEG thumbnails: 2" in first.stdout
    check_screenshot(shot, viewport(first))
    assert second.returncode != 0 and "Segmentations oblique to the acquisition plane of the source data are not " \
        "yet supported" in second.stdout, second.stdout


def test_ohif_and_the_key_slice_outlines_of_the_report(tmp_path: Path) -> None:
    """What OHIF 3.13.2 does with the key-slice outlines, on the real Dixon study with its
    sagittal level reference processed by the pipeline: the main report (reports.sr, TID 1410
    outlines among all other groups) and the outline document (reports.outline_report).

    1. OHIF cannot open the main report ("Something went wrong"), which this asserts so that it
       notices when OHIF changes: its SR extension (``@ohif/extension-cornerstone-dicom-sr``,
       ``getSopClassHandlerModule``) parses every measurement group in ``_load``, and
       ``_checkIfCanAddMeasurementsToDisplaySet`` reads ``measurement.coords[0].ReferencedSOPSequence``
       of each one; a group without a SCOORD (the volumetric TID 1411 groups, the level TID 1501
       groups, the per-slice TID 1410 groups that reference SEG frames) has no coordinates, and
       that read throws a TypeError.
    2. Its measurement panel lists only measurements it "hydrates" into cornerstone tools
       (``@cornerstonejs/adapters`` ``MeasurementReport``): a tracking identifier naming a
       cornerstone tool and the SCOORD INFERRED FROM the group's first NUM (TID 300 within TID
       1501, as dcmjs writes it). TID 1410's outline is the group's own region, so even the main
       report's outlines alone are drawn with their labels but not listed (found by the earlier
       version of this test on a copy of the report reduced to them). The outline document has
       exactly that form: OHIF asks whether to track its measurements and lists them, one row per
       outline with its disc.
    """
    chromium, node, dist = requirements()
    import pydicom

    from inference.registry import DEFAULT_MODEL, load_model
    from inference.runtime import Segmenter
    from reports.outline_report import CORNERSTONE_FREEHAND
    from reports.pipeline import WorkItem, run

    studies.require_data()
    studies.require_data(studies.vertebrae_files(studies.TUM01_VERTEBRAE_SUBJECT))
    study, _ = studies.write_dixon_study_with_sagittal(tmp_path / "study", seed="viewer-key-slices")
    segmenter = Segmenter(load_model(DEFAULT_MODEL), providers="cpu", threads=2)
    results = run(WorkItem("dixon", {role: study.series[role].files for role in ("water", "fat")},
                           level_reference=tuple(study.series["sagittal"].files)), segmenter, software_version="0.1.0")
    (seg,) = results.segmentations
    assert [kind for kind, _ in results.datasets][:3] == ["seg", "sr", "outlines"]
    paths = {}
    for kind, dataset in results.datasets[:3]:
        paths[kind] = tmp_path / f"{kind}.dcm"
        dataset.save_as(paths[kind])
    outlines = pydicom.dcmread(paths["outlines"])
    container = next(i for i in outlines.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = list(container.ContentSequence)
    identifiers = [i.TextValue for g in groups for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039"]
    assert len(groups) >= 8 and identifiers == [CORNERSTONE_FREEHAND] * len(groups), identifiers
    (_, full), (_, listed) = show_srs(
        tmp_path, study.series["water"].files, list(paths.values()), study.study_uid, "ohif-key-slices", chromium,
        node, dist, [str(results.report.SeriesDescription), str(outlines.SeriesDescription)])
    # 1. The main report: the first group without coordinates throws.
    assert "Cannot read properties of undefined (reading 'ReferencedSOPSequence')" in full.stdout, full.stdout
    assert "_checkIfCanAddMeasurementsToDisplaySet" in full.stdout, full.stdout
    # 2. The outline document: hydrated and listed, one row per outline with its disc.
    assert listed.returncode == 0 and "tracking prompt: yes" in listed.stdout, listed.stdout + listed.stderr
    assert "not rehydratable" not in listed.stdout, listed.stdout
    panel = listed.stdout.split("PANEL ", 1)[1].splitlines()[0]
    assert f"Measurements ({len(groups)})" in panel, panel
    assert panel.count("disc") == len(groups), panel
    # Each row's area: the document's (rounded), or on the image shown cornerstone's own from the
    # outline (within 1 mm2 here). The fat NUM and the side are not shown by OHIF.
    areas = sorted(float(i.MeasuredValueSequence[0].NumericValue) for g in groups for i in g.ContentSequence
                   if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "42798000")
    shown = sorted(float(v) for v in re.findall(r"([\d.]+)(?: mm²)? Max:", panel))
    assert len(shown) == len(areas) and np.allclose(shown, areas, atol=1.0), (shown, areas)


@contextlib.contextmanager
def ohif_serving(tmp_path: Path, images: list[Path], results: list[Path], dist: Path) -> Iterator[tuple[str, Path]]:
    """A DICOMweb Orthanc holding the images and results, and OHIF served from the same origin:
    yields (origin, folder for screenshots); both are stopped on leaving."""
    orthanc = dicomweb_orthanc(tmp_path / "orthanc").start()
    server = None
    try:
        orthanc.upload(images)
        orthanc.upload(results)
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        config = (VIEWER / "app-config.js").read_text().replace("__ORIGIN__", origin).encode()
        server = same_origin_server(port, dist, config, orthanc.url)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        artifacts = Path(os.environ.get("MUSCLENODE_ARTIFACTS", REPO / "artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        yield origin, artifacts
    finally:
        if server is not None:
            server.shutdown()
        orthanc.stop()


def show_srs(tmp_path: Path, images: list[Path], results: list[Path], study_uid: str, name: str, chromium: str,
             node: str, dist: Path, descriptions: list[str]) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Load each SR (by series description) in OHIF with tests/viewer/sr.mjs: screenshots and
    what it said."""
    shots = []
    with ohif_serving(tmp_path, images, results, dist) as (origin, artifacts):
        for index, description in enumerate(descriptions, start=1):
            shot = artifacts / f"{name}-{index}.png"
            result = subprocess.run([node, str(VIEWER / "sr.mjs"), origin, study_uid, str(shot), description],
                                    cwd=VIEWER, capture_output=True, text=True, timeout=170,
                                    env={**os.environ, "CHROMIUM": chromium})
            shots.append((shot, result))
    return shots


def viewport(result: subprocess.CompletedProcess) -> dict[str, float]:
    """The viewport box view.mjs printed, after checking that it ran through."""
    assert result.returncode == 0, f"viewer script failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.split("VIEWPORT ", 1)[1].splitlines()[0])


def show(tmp_path: Path, images: list[Path], segs: list[Path], study_uid: str, name: str, chromium: str, node: str,
         dist: Path, seg_indices: tuple[int, ...]) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Load each SEG in OHIF: screenshots and what view.mjs said."""
    shots = []
    with ohif_serving(tmp_path, images, segs, dist) as (origin, artifacts):
        for index in seg_indices:
            shot = artifacts / (f"{name}.png" if len(seg_indices) == 1 else f"{name}-{index + 1}.png")
            result = subprocess.run(
                [node, str(VIEWER / "view.mjs"), origin, study_uid, str(shot), *LABELS],
                cwd=VIEWER, capture_output=True, text=True, timeout=170,
                env={**os.environ, "CHROMIUM": chromium, "SEG_INDEX": str(index)},
            )
            shots.append((shot, result))
    return shots


def check_screenshot(shot: Path, box: dict[str, float]) -> None:
    """The muscles' colours are drawn, posterior, with the patient's left on the viewer's right."""
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    x0, y0 = int(box["x"]), int(box["y"])
    # Inside the viewport's border, which OHIF draws in blue around the active viewport.
    view = image[y0 + 4:y0 + int(box["height"]) - 4, x0 + 4:x0 + int(box["width"]) - 4]
    r, g, b = view[..., 0], view[..., 1], view[..., 2]
    # Multifidus is drawn in reds and erector spinae in blues (reports.seg), blended with the image.
    hues = {"multifidus": (r > g + 50) & (r > b + 30), "erector spinae": (b > r + 50) & (b > g + 20)}
    drawn = hues["multifidus"] | hues["erector spinae"]
    assert hues["multifidus"].sum() > 500 and hues["erector spinae"].sum() > 2000, {k: int(v.sum()) for k, v in hues.items()}
    ys, xs = np.nonzero(drawn)
    midline = xs.mean()
    # Paraspinal muscles lie behind the spine: in the posterior (lower) half of the body as an
    # axial view shows it (the body: the grey pixels of the image, annotations aside).
    grey = (np.abs(r - g) < 12) & (np.abs(g - b) < 12) & (r > 60)
    body_rows = np.nonzero(grey)[0]
    body_centre = (np.percentile(body_rows, 2) + np.percentile(body_rows, 98)) / 2
    assert ys.mean() > body_centre, (ys.mean(), body_centre, view.shape)
    for name, mask in hues.items():
        ys, xs = np.nonzero(mask)
        lightness = view[mask].sum(axis=1)
        viewer_right = lightness[xs > midline].mean()
        viewer_left = lightness[xs < midline].mean()
        # Multifidus hugs the midline; erector spinae lies lateral to it.
        assert (xs > midline).any() and (xs < midline).any(), name
        # The patient's left segment has the lighter colour, and must be on the viewer's right.
        assert viewer_right > viewer_left + 20, (name, viewer_left, viewer_right)
    spread = {name: np.abs(np.nonzero(mask)[1] - midline).mean() for name, mask in hues.items()}
    assert spread["multifidus"] < spread["erector spinae"], spread
