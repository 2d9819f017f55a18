"""Muscle metrics: phantoms of known geometry and fat, mirroring, and the real TUM01 labels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from inference.card import LabelInfo
from inference.geometry import FrameGeometry, LabelMap, SeriesImage, StudyInfo, group_stacks, read_series
from reports.fat import cluster_fat, dixon_fat_fraction
from reports.levels import LEVEL_RANGES, levels_by_height, range_members
from reports.metrics import FatSource, measure
from tests import studies

MEANING = {
    1: LabelInfo("erector_spinae", "right"),
    2: LabelInfo("multifidus", "right"),
    3: LabelInfo("multifidus", "left"),
    4: LabelInfo("erector_spinae", "left"),
}


def _series(frames: list[np.ndarray], geometry: list[FrameGeometry], uid: str = "1.2.3") -> SeriesImage:
    return SeriesImage(
        frames=tuple(frames), geometry=tuple(geometry), stacks=group_stacks(geometry),
        series_instance_uid=uid, frame_of_reference_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study=StudyInfo("1.9"),
    )


def _oblique_stack(tilt_degrees: float, slices: int, step_mm: float, size: int = 120, spacing=(0.8, 0.6)):
    """Frames of an oblique stack: rotated about the patient's left-right axis, stepped along the normal."""
    rotation = Rotation.from_euler("x", tilt_degrees, degrees=True).as_matrix()
    row, column = rotation @ [1.0, 0, 0], rotation @ [0, 1.0, 0]
    normal = np.cross(row, column)
    centre = np.array([0.0, 0.0, 0.0])
    frames = []
    for k in range(slices):
        origin = centre + k * step_mm * normal - (size / 2) * spacing[1] * row - (size / 2) * spacing[0] * column
        frames.append(FrameGeometry(tuple(origin), tuple(row), tuple(column), spacing, size, size,
                                    sop_instance_uid=f"1.2.3.{k}", frame_number=1))
    return frames


def _ellipse_mask(geometry: FrameGeometry, centre_lps, semi_axes_mm, in_plane_axes) -> np.ndarray:
    """Pixels whose centres lie inside an ellipse drawn in the frame's own plane."""
    rows, columns = np.mgrid[: geometry.rows, : geometry.columns]
    points = geometry.pixel_to_lps(rows, columns) - np.asarray(centre_lps)
    u = points @ np.asarray(in_plane_axes[0])
    v = points @ np.asarray(in_plane_axes[1])
    return (u / semi_axes_mm[0]) ** 2 + (v / semi_axes_mm[1]) ** 2 <= 1


def test_ellipses_on_oblique_planes_have_their_area_volume_and_fat_fraction() -> None:
    geometry = _oblique_stack(tilt_degrees=23, slices=6, step_mm=4.0)
    semi = {"left": (14.0, 9.0), "right": (11.0, 7.0)}
    labels, water, fat = [], [], []
    for frame in geometry:
        row, column = np.asarray(frame.row_cosine), np.asarray(frame.column_cosine)
        centre = np.asarray(frame.centre)
        # The patient's left is +x in LPS: the left muscle sits at +x, the right one at -x.
        left = _ellipse_mask(frame, centre + 25 * row, semi["left"], (row, column))
        right = _ellipse_mask(frame, centre - 25 * row, semi["right"], (row, column))
        label = np.zeros(frame.shape, np.uint8)
        label[left], label[right] = 3, 2
        labels.append(label)
        # Known fat fractions: 30 % in the left muscle, 10 % in the right, water elsewhere.
        f = np.where(left, 30.0, np.where(right, 10.0, 0.0))
        water.append((100.0 - f).astype(np.float32))
        fat.append(f.astype(np.float32))
    water_series = _series(water, geometry, "1.1")
    fat_series = _series(fat, geometry, "1.2")
    label_map = LabelMap(water_series, tuple(labels), MEANING)
    results = {(m.muscle, m.side): m for m in measure(label_map, FatSource(water=water_series, fat=fat_series))}

    pixel_area = 0.8 * 0.6
    for side, (a, b) in semi.items():
        metrics = results[("multifidus", side)]
        exact = math.pi * a * b
        # Discretisation: pixels are counted whole; the error is bounded by the perimeter band.
        perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
        assert abs(metrics.mean_csa_mm2 - exact) < perimeter * math.sqrt(pixel_area) * 0.5
        assert metrics.n_slices == 6
        assert metrics.volume_cm3 == pytest.approx(sum(s.area_mm2 for s in metrics.slices) * 4.0 / 1000)
    assert results[("multifidus", "left")].fat.mean_percent == pytest.approx(30.0)
    assert results[("multifidus", "right")].fat.median_percent == pytest.approx(10.0)
    both = results[("multifidus", "both")]
    assert both.mean_csa_mm2 == pytest.approx(results[("multifidus", "left")].mean_csa_mm2
                                              + results[("multifidus", "right")].mean_csa_mm2)
    left, right = results[("multifidus", "left")].mean_csa_mm2, results[("multifidus", "right")].mean_csa_mm2
    assert both.asymmetry_percent == pytest.approx((right - left) / ((right + left) / 2) * 100)
    lean = results[("multifidus", "left")]
    assert lean.functional_csa_mm2 == pytest.approx(lean.mean_csa_mm2 * 0.7)


def test_mirrored_input_swaps_left_and_right_results() -> None:
    geometry = _oblique_stack(tilt_degrees=0, slices=3, step_mm=3.0, size=80, spacing=(1.0, 1.0))
    labels = []
    for frame in geometry:
        row, column = np.asarray(frame.row_cosine), np.asarray(frame.column_cosine)
        label = np.zeros(frame.shape, np.uint8)
        label[_ellipse_mask(frame, np.asarray(frame.centre) + 20 * row, (12, 8), (row, column))] = 3
        label[_ellipse_mask(frame, np.asarray(frame.centre) - 20 * row, (6, 5), (row, column))] = 2
        labels.append(label)
    image = [np.ones(g.shape, np.float32) for g in geometry]
    original = {(m.muscle, m.side): m for m in measure(LabelMap(_series(image, geometry), tuple(labels), MEANING))}
    # The same patient imaged with columns running the other way: the arrays are mirrored, the
    # row cosine is reversed, and the anatomy stays where it is.
    mirrored_geometry = [
        FrameGeometry(tuple(g.pixel_to_lps(0, g.columns - 1)), tuple(-np.asarray(g.row_cosine)), g.column_cosine,
                      g.pixel_spacing, g.rows, g.columns, g.sop_instance_uid, 1)
        for g in geometry
    ]
    mirrored = [label[:, ::-1].copy() for label in labels]
    again = {(m.muscle, m.side): m for m in measure(
        LabelMap(_series(image, mirrored_geometry), tuple(mirrored), MEANING))}
    for side in ("left", "right"):
        assert again[("multifidus", side)].mean_csa_mm2 == pytest.approx(original[("multifidus", side)].mean_csa_mm2)
    # Swapping the label values instead (a model that confused the sides) swaps the results.
    swapped = [np.where(label == 3, 2, np.where(label == 2, 3, 0)).astype(np.uint8) for label in labels]
    flipped = {(m.muscle, m.side): m for m in measure(LabelMap(_series(image, geometry), tuple(swapped), MEANING))}
    assert flipped[("multifidus", "left")].mean_csa_mm2 == pytest.approx(original[("multifidus", "right")].mean_csa_mm2)
    assert flipped[("multifidus", "both")].asymmetry_percent == pytest.approx(
        -original[("multifidus", "both")].asymmetry_percent)


def _square_stack(slices: int) -> LabelMap:
    """``slices`` axial frames 10 mm apart, each with the same 10 x 10 mm left multifidus."""
    geometry = _oblique_stack(tilt_degrees=0, slices=slices, step_mm=10.0, size=40, spacing=(1.0, 1.0))
    labels = []
    for frame in geometry:
        label = np.zeros(frame.shape, np.uint8)
        label[10:20, 25:35] = 3
        labels.append(label)
    image = [np.ones(g.shape, np.float32) for g in geometry]
    return LabelMap(_series(image, geometry), tuple(labels), MEANING)


def test_levels_group_the_slices() -> None:
    level_of = levels_by_height({"L4": (-1.0, 15.0), "L3": (15.0, 35.0)})
    results = measure(_square_stack(4), level_of=level_of)
    counts = {(m.level, m.side): m.n_slices for m in results}
    assert counts[("all", "left")] == 4 and counts[("L4", "left")] == 2 and counts[("L3", "left")] == 2
    with pytest.raises(ValueError, match="overlap"):
        levels_by_height({"L4": (0.0, 20.0), "L3": (10.0, 30.0)})


def test_a_range_of_levels_is_a_group_only_where_every_body_and_disc_has_a_slice() -> None:
    label_map = _square_stack(6)
    heights = sorted(float(g.centre[2]) for g in label_map.series.geometry)
    # Head to foot: L3, L3-L4, L4, L4-L5, L5, L5 (one slice each, two at L5).
    names = ["L5", "L5", "L4-L5", "L4", "L3-L4", "L3"]
    ranges = {name: (h - 1.0, h + 1.0) for h, name in zip(heights, names) if name != "L5"}
    ranges["L5"] = (heights[0] - 1.0, heights[1] + 1.0)
    level_of = levels_by_height(ranges)
    results = {(m.level, m.side): m for m in measure(label_map, level_of=level_of, level_ranges=LEVEL_RANGES)}
    assert results[("L3-L5", "left")].n_slices == 6
    assert results[("L3-L5", "left")].volume_cm3 == pytest.approx(results[("all", "left")].volume_cm3)
    assert ("L1-L5", "left") not in results  # L1 to L2-L3 have no slice
    # A disc without a slice (L4-L5 not assigned): the range is not covered, so no group.
    del ranges["L4-L5"]
    gaps = {(m.level, m.side) for m in measure(label_map, level_of=levels_by_height(ranges), level_ranges=LEVEL_RANGES)}
    assert ("L3-L5", "left") not in gaps and ("L4", "left") in gaps
    assert range_members("L1-L5")[:3] == ("L1", "L1-L2", "L2")
    with pytest.raises(ValueError, match="at least three bodies"):
        range_members("L4-L5")


def test_a_disc_level_carries_its_key_slice() -> None:
    geometry = _oblique_stack(tilt_degrees=0, slices=4, step_mm=10.0, size=40, spacing=(1.0, 1.0))
    labels = []
    for index, frame in enumerate(geometry):
        label = np.zeros(frame.shape, np.uint8)
        label[10:20 + index, 25:35] = 3  # 100, 110, 120, 130 mm2 on the left
        labels.append(label)
    image = [np.ones(g.shape, np.float32) for g in geometry]
    label_map = LabelMap(_series(image, geometry), tuple(labels), MEANING)
    level_of = levels_by_height({"L4-L5": (-1.0, 35.0)})
    heights = sorted(g.centre[2] for g in geometry)
    key = [round(g.centre[2], 3) for g in geometry].index(round(heights[2], 3))
    results = {(m.level, m.side): m for m in measure(label_map, level_of=level_of, key_frames={"L4-L5": key})}
    left = results[("L4-L5", "left")]
    assert left.key_slice is not None and left.key_slice.frame_index == key
    assert left.key_slice.area_mm2 == pytest.approx(100.0 + 10 * key)
    assert results[("L4-L5", "both")].key_slice.area_mm2 == pytest.approx(100.0 + 10 * key)
    assert results[("all", "left")].key_slice is None
    # The key slice excluded by quality control: the level has none rather than another frame's numbers.
    again = {(m.level, m.side): m for m in measure(label_map, level_of=level_of, key_frames={"L4-L5": key},
                                                    exclude={key})}
    assert again[("L4-L5", "left")].key_slice is None


@pytest.fixture(scope="module")
def tum01(tmp_path_factory: pytest.TempPathFactory):
    studies.require_data()
    folder = tmp_path_factory.mktemp("tum01")
    study = studies.write_dixon_study(folder, contrasts=("water", "fat", "in_phase"))
    series = {role: read_series(info.files) for role, info in study.series.items()}
    volumes = studies.load_volumes()
    water = series["water"]
    # Manual labels on the DICOM grid: slice k is labels[:, :, k].T, as the studies module writes pixels.
    by_position = {}
    for k in range(volumes.labels.shape[2]):
        by_position[k] = volumes.labels[:, :, k].T.astype(np.uint8)
    labels = []
    for geometry in water.geometry:
        k = int(round((geometry.position[2] - water.geometry[water.stacks[0][0]].position[2])
                      / (water.stack_offsets(0)[1] - water.stack_offsets(0)[0])))
        labels.append(by_position[k])
    return series, LabelMap(water, tuple(labels), MEANING), volumes


def test_real_fat_fraction_equals_numpy_and_is_healthy(tum01) -> None:
    series, label_map, volumes = tum01
    results = measure(label_map, FatSource(water=series["water"], fat=series["fat"], erode=False))
    fraction = dixon_fat_fraction(volumes.water, volumes.fat)
    names = {1: ("erector_spinae", "right"), 2: ("multifidus", "right"), 3: ("multifidus", "left"),
             4: ("erector_spinae", "left")}
    by_key = {(m.muscle, m.side): m for m in results if m.level == "all"}
    for value, key in names.items():
        expected = float(np.nanmean(fraction[volumes.labels == value])) * 100
        got = by_key[key].fat.mean_percent
        assert got == pytest.approx(expected, abs=1e-4), key
        assert 8 <= got <= 22, f"{key}: {got:.1f} % is outside a healthy adult's range"
        voxel_area = float(np.prod(series["water"].geometry[0].pixel_spacing))
        assert by_key[key].volume_cm3 == pytest.approx((volumes.labels == value).sum() * voxel_area * 4.0 / 1000)
    # Left and right come from patient coordinates: left muscles sit at larger LPS x.
    assert by_key[("multifidus", "left")].slices[0].centroid_lps[0] > by_key[("multifidus", "right")].slices[0].centroid_lps[0]


def test_gmm_on_in_phase_is_close_to_dixon(tum01) -> None:
    series, label_map, _ = tum01
    dixon = {(m.muscle, m.side): m.fat.mean_percent
             for m in measure(label_map, FatSource(water=series["water"], fat=series["fat"], erode=False))
             if m.level == "all"}
    in_phase = LabelMap(series["in_phase"], label_map.labels, MEANING)
    gmm = {(m.muscle, m.side): m.fat for m in measure(in_phase, FatSource(cluster="gmm3")) if m.level == "all"}
    for key in (("erector_spinae", "left"), ("erector_spinae", "right"), ("multifidus", "left"), ("multifidus", "right")):
        assert gmm[key].quantity == "fat_infiltration" and gmm[key].reliable
        assert abs(gmm[key].mean_percent - dixon[key]) <= 5, (key, gmm[key].mean_percent, dixon[key])


def test_psoas_by_clustering_is_flagged_unreliable() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(100, 10, 900), rng.normal(400, 20, 100)])
    assert cluster_fat([values], "gmm2").fat_percent == pytest.approx(10, abs=1.5)
    assert cluster_fat([values], "kmeans2").fat_percent == pytest.approx(10, abs=1.5)
    # Slices too small for a model of their own are classified by one of all the voxels.
    pieces = cluster_fat([values[:30], values[30:]], "gmm2")
    assert pieces.slices_fitted == 1 and pieces.voxels == values.size
    with pytest.raises(ValueError, match="too few"):
        cluster_fat([values[:50]], "gmm3")
    geometry = _oblique_stack(0, 2, 4.0, size=40, spacing=(1.0, 1.0))
    psoas = {5: LabelInfo("psoas_major", "left")}
    labels = [np.zeros(g.shape, np.uint8) for g in geometry]
    for label in labels:
        label[5:35, 25:38] = 5
    image = [rng.normal(100, 10, g.shape).astype(np.float32) for g in geometry]
    result = measure(LabelMap(_series(image, geometry), tuple(labels), psoas), FatSource(cluster="gmm3"))
    assert not result[0].fat.reliable and "unreliable" in result[0].fat.note


def test_real_metrics_are_assessed_against_the_reference(tum01) -> None:
    from reports.assessment import assess
    from inference.patient import from_sidecar

    series, label_map, _ = tum01
    results = [m for m in measure(label_map, FatSource(water=series["water"], fat=series["fat"]))
               if m.level == "all"]
    patient = from_sidecar({"age": 34, "sex": "M", "height_m": 1.78, "weight_kg": 74})
    assessed = {(a.metrics.muscle, a.metrics.side): a for a in assess(results, patient)}
    multifidus = assessed[("multifidus", "left")]
    assert multifidus.fat.z is not None and 0 < multifidus.fat.percentile < 100
    assert multifidus.fat.stratum.source and "L1-L5" in multifidus.levels_note
    assert multifidus.grade.value == 0 and multifidus.severe.value is False
    assert multifidus.csa.z is None and multifidus.csa.reason
    unknown_sex = from_sidecar({"age": 34, "height_m": 1.78, "weight_kg": 74})
    again = {(a.metrics.muscle, a.metrics.side): a for a in assess(results, unknown_sex)}
    # The decade rows pool the sexes, so a missing sex still gets a comparison; a missing age
    # with a missing sex gets none, and says why.
    nobody = from_sidecar({})
    none = {(a.metrics.muscle, a.metrics.side): a for a in assess(results, nobody)}
    assert none[("multifidus", "left")].fat.z is None and none[("multifidus", "left")].fat.reason
    assert again[("multifidus", "left")].fat is not None


def test_with_levels_each_level_is_compared_where_the_reference_has_it(tum01) -> None:
    """Level groups use the reference's rows of their own level; a level without one says so, and
    the whole series is the stated fallback against the lumbar range."""
    from inference.patient import from_sidecar
    from reports.assessment import assess

    series, label_map, _ = tum01
    heights = sorted(float(g.centre[2]) for g in series["water"].geometry)
    level_of = levels_by_height({"L5": (heights[0] - 1, heights[9] + 0.5), "L4-L5": (heights[10] - 0.5, heights[14] + 0.5),
                                 "L4": (heights[15] - 0.5, heights[-1] + 1)})
    metrics = measure(label_map, FatSource(water=series["water"], fat=series["fat"]), level_of)
    patient = from_sidecar({"age": 34, "sex": "M", "height_m": 1.78, "weight_kg": 74})
    assessed = {(a.metrics.muscle, a.metrics.side, a.metrics.level): a for a in assess(metrics, patient)}
    whole = assessed[("multifidus", "left", "all")]
    assert whole.levels == "L1-L5" and whole.fat.z is not None
    assert whole.levels_note == ("levels identified (L4 to L5): each level is compared where the reference has that "
                                 "level; all slices together are compared with the L1-L5 reference")
    at_l4 = assessed[("multifidus", "left", "L4")]
    assert at_l4.fat.z is None and "reference over L4 (available: L1-L5)" in at_l4.fat.reason
    assert at_l4.levels_note is None


def test_erosion_over_the_bounding_box_equals_the_whole_frames() -> None:
    """reports.fat.erode works on the mask's bounding box: the same pixels as eroding the frame,
    masks at the frame's edges included."""
    from scipy import ndimage

    from reports.fat import erode

    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = np.zeros((60, 70), bool)
        r, c = rng.integers(0, 60), rng.integers(0, 70)
        mask[max(0, r - rng.integers(0, 20)):r + rng.integers(1, 20), max(0, c - rng.integers(0, 20)):c + rng.integers(1, 20)] = True
        mask &= rng.random(mask.shape) > 0.1
        whole = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))
        assert np.array_equal(erode(mask), whole if whole.any() else mask)
