"""Muscle metrics from a label map: areas, volumes, fat, asymmetry, per side and level.

For each muscle, left, right and both sides together:

- cross-sectional area (CSA) per slice, in the slice's own plane (pixel count x pixel area, so an
  oblique slice is measured in its own plane, not projected);
- mean CSA over the slices that contain the muscle, and the number of those slices;
- volume over the imaged range: the sum of slice areas x the slice spacing of their stack (slice
  gaps count as muscle, as in any slice-based volume; overlapping slabs are counted once each);
- fat: the Dixon fat fraction (mean and median of F / (F + W) in the mask, after a one-pixel
  erosion by default), the vendor's fat-fraction map, the two-point Dixon fat signal fraction
  (IP - OP) / (2 IP) from in-phase and opposed-phase images (same erosion; below 50 % only), or,
  for T1/T2 images, fat infiltration by clustering (see :mod:`reports.fat`);
- functional (lean) CSA = mean CSA x (1 - fat fraction);
- left/right asymmetry = (right - left) / mean(right, left) x 100 of the mean CSA (signed:
  positive when the right side is larger);
- the covered range along the patient's head-foot axis.

Metrics are grouped by vertebral level when a level is known for a slice (see
:mod:`reports.levels`); the group ``"all"`` is always present. Everything here is a pure function
of the label map and images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from inference.geometry import FrameGeometry, LabelMap, SeriesImage, pair_frames
from inference.vocabulary import FatMethod, FatQuantity, Laterality, Muscle

from .fat import cluster_fat, dixon_fat_fraction, erode, summarise_fraction, two_point_fat_fraction, vendor_fraction
from .grades import CITATION_WESSELINK_2024, fat_unreliable_reason
from .levels import range_members

__all__ = ["ALL_LEVELS", "FatSource", "FatResult", "MuscleMetrics", "SliceArea", "measure"]

ALL_LEVELS = "all"
#: A level assigner: the vertebral level (e.g. "L3", "L4-L5") of a frame, or None if unknown.
LevelAssigner = Callable[[FrameGeometry], "str | None"]


@dataclass(frozen=True)
class FatSource:
    """Where fat comes from for a label map.

    Exactly one of: ``water`` and ``fat`` (Dixon components of the label map's acquisition),
    ``fraction`` (a vendor fat-fraction series), ``in_phase`` and ``opposed_phase`` (two-point
    Dixon components of the acquisition), or ``cluster`` (a clustering
    :class:`~inference.vocabulary.FatMethod`, applied to the label map's own images).

    Raises
    ------
    ValueError
        When none or several sources are given, or a pair lacks a partner.
    """

    water: SeriesImage | None = None
    fat: SeriesImage | None = None
    fraction: SeriesImage | None = None
    cluster: FatMethod | None = None
    erode: bool = True
    in_phase: SeriesImage | None = None
    opposed_phase: SeriesImage | None = None

    def __post_init__(self) -> None:
        dixon = self.water is not None or self.fat is not None
        two_point = self.in_phase is not None or self.opposed_phase is not None
        chosen = [dixon, self.fraction is not None, two_point, self.cluster is not None]
        if sum(chosen) != 1:
            raise ValueError("a fat source is Dixon water and fat, a fat-fraction map, in-phase and opposed-phase "
                             "images, or a cluster method")
        if dixon and (self.water is None or self.fat is None):
            raise ValueError("Dixon fat needs both the water and the fat series")
        if two_point and (self.in_phase is None or self.opposed_phase is None):
            raise ValueError("two-point Dixon fat needs both the in-phase and the opposed-phase series")
        if self.cluster is not None:
            if self.cluster not in FatMethod.clustering_methods():
                raise ValueError(f"unknown cluster method {self.cluster!r}; use one of "
                                 f"{', '.join(FatMethod.clustering_methods())}")
            object.__setattr__(self, "cluster", FatMethod(self.cluster))

    @property
    def method(self) -> FatMethod:
        if self.cluster is not None:
            return self.cluster
        if self.in_phase is not None:
            return FatMethod.TWO_POINT_DIXON_FF
        return FatMethod.DIXON_VENDOR_FF if self.fraction is not None else FatMethod.DIXON_FF


@dataclass(frozen=True)
class SliceArea:
    """A muscle on one frame."""

    frame_index: int
    sop_instance_uid: str
    frame_number: int
    level: str | None
    area_mm2: float
    voxels: int
    centroid_lps: tuple[float, float, float]
    fat_percent: float | None = None


@dataclass(frozen=True)
class FatResult:
    """Fat of one muscle group.

    Attributes
    ----------
    method : FatMethod
    quantity : FatQuantity
        Fat fraction (Dixon) or fat infiltration (clustering of T1/T2 intensities): different
        quantities, never compared with each other's references.
    mean_percent, median_percent : float or None
        Over the voxels of the mask (eroded if ``eroded``); clustering gives the share of fat
        voxels as the mean and no median.
    intermediate_percent : float or None
        The middle class of a 3-class clustering.
    eroded : bool
    voxels : int
    reliable : bool
        False for psoas measured by clustering.
    note : str
    """

    method: FatMethod
    quantity: FatQuantity
    mean_percent: float | None
    median_percent: float | None
    eroded: bool
    voxels: int
    intermediate_percent: float | None = None
    reliable: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", FatMethod(self.method))
        object.__setattr__(self, "quantity", FatQuantity(self.quantity))


@dataclass(frozen=True)
class MuscleMetrics:
    """Metrics of one muscle, one side or both sides together, one level group.

    ``key_slice`` is, for a disc level (``"L4-L5"``), the muscle on the frame nearest the middle
    of the disc (None for other groups, or when the muscle is absent from that frame).
    """

    muscle: Muscle
    side: Laterality
    level: str
    slices: tuple[SliceArea, ...]
    mean_csa_mm2: float
    volume_cm3: float | None
    fat: FatResult | None
    functional_csa_mm2: float | None
    asymmetry_percent: float | None
    range_mm: tuple[float, float]
    label_values: tuple[int, ...] = field(default=())
    key_slice: SliceArea | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "muscle", Muscle(self.muscle))
        object.__setattr__(self, "side", Laterality(self.side))

    @property
    def n_slices(self) -> int:
        return len(self.slices)


def _stack_spacing(series: SeriesImage) -> dict[int, float | None]:
    """Slice spacing (mm) for each frame: the median step between neighbours of its stack."""
    spacing: dict[int, float | None] = {}
    for number in range(len(series.stacks)):
        indices = series.stacks[number]
        offsets = series.stack_offsets(number)
        steps = np.diff(offsets)
        steps = steps[steps > 1e-3]
        if steps.size:
            step = float(np.median(steps))
        else:
            thickness = series.geometry[indices[0]].slice_thickness
            step = float(thickness) if thickness else None
        for index in indices:
            spacing[index] = step
    return spacing


def _interrupted(series: SeriesImage, measured: Collection[int], excluded: Collection[int]) -> bool:
    """Whether an excluded frame lies between two measured frames of the same stack."""
    for stack in series.stacks:
        order = list(stack)
        positions = [k for k, index in enumerate(order) if index in measured]
        if len(positions) > 1 and any(order[k] in excluded for k in range(positions[0], positions[-1])):
            return True
    return False


def _fraction_frames(label_map: LabelMap, source: FatSource) -> list[np.ndarray] | None:
    """Per label-map frame, the voxel fat fraction on the same grid (None for clustering)."""
    series = label_map.series
    if source.cluster is not None:
        return None
    if source.fraction is not None:
        pairs = pair_frames(series, source.fraction)
        return [vendor_fraction(source.fraction.frames[j]) for j in pairs]
    if source.in_phase is not None:
        in_pairs = pair_frames(series, source.in_phase)
        opposed_pairs = pair_frames(series, source.opposed_phase)
        return [
            two_point_fat_fraction(source.in_phase.frames[i], source.opposed_phase.frames[o])
            for i, o in zip(in_pairs, opposed_pairs)
        ]
    water_pairs = pair_frames(series, source.water)
    fat_pairs = pair_frames(series, source.fat)
    return [
        dixon_fat_fraction(source.water.frames[w], source.fat.frames[f])
        for w, f in zip(water_pairs, fat_pairs)
    ]


def _group_metrics(
    label_map: LabelMap,
    muscle: Muscle,
    side: Laterality,
    values: tuple[int, ...],
    frames: Sequence[int],
    level: str,
    levels: Mapping[int, str | None],
    spacing: Mapping[int, float | None],
    fractions: list[np.ndarray] | None,
    source: FatSource | None,
    excluded: Collection[int] = (),
) -> MuscleMetrics | None:
    series = label_map.series
    slices: list[SliceArea] = []
    fat_values: list[np.ndarray] = []
    intensities: list[np.ndarray] = []
    volume = 0.0
    volume_known = True
    for index in frames:
        mask = np.isin(label_map.labels[index], values)
        voxels = int(mask.sum())
        if voxels == 0:
            continue
        geometry = series.geometry[index]
        area = voxels * geometry.pixel_spacing[0] * geometry.pixel_spacing[1]
        rows, columns = np.nonzero(mask)
        centroid = geometry.pixel_to_lps(rows.mean(), columns.mean())
        slice_fat = None
        if fractions is not None:
            inside = fractions[index][erode(mask) if source.erode else mask]
            fat_values.append(inside)
            summary = summarise_fraction(inside)
            slice_fat = summary.mean_percent if summary else None
        elif source is not None:
            intensities.append(series.frames[index][mask])
        slices.append(SliceArea(
            frame_index=index, sop_instance_uid=geometry.sop_instance_uid, frame_number=geometry.frame_number,
            level=levels.get(index), area_mm2=float(area), voxels=voxels,
            centroid_lps=tuple(float(v) for v in centroid), fat_percent=slice_fat,
        ))
        if spacing.get(index) is None:
            volume_known = False
        else:
            volume += area * spacing[index]
    if not slices:
        return None
    if excluded and _interrupted(series, {s.frame_index for s in slices}, excluded):
        volume_known = False
    mean_csa = float(np.mean([s.area_mm2 for s in slices]))
    fat = _fat_result(muscle, fat_values, intensities, source)
    fat_percent = fat.mean_percent if fat is not None else None
    functional = mean_csa * (1 - fat_percent / 100) if fat_percent is not None else None
    heights = [s.centroid_lps[2] for s in slices]
    return MuscleMetrics(
        muscle=muscle, side=side, level=level, slices=tuple(slices), mean_csa_mm2=mean_csa,
        volume_cm3=volume / 1000 if volume_known else None, fat=fat, functional_csa_mm2=functional,
        asymmetry_percent=None, range_mm=(float(min(heights)), float(max(heights))), label_values=values,
    )


#: A method with an ambiguity limit (two-point Dixon, 50 %) gets a caution when more than this share
#: of a muscle's voxels reads within :data:`_NEAR_LIMIT_POINTS` of it: part of that muscle may be
#: fattier than the limit and read as leaner than it is.
_NEAR_LIMIT_SHARE = 0.10
_NEAR_LIMIT_POINTS = 5.0


def _near_limit_note(method: FatMethod, fat_values: list[np.ndarray]) -> str:
    """The caution for a muscle whose voxels crowd the method's ambiguity limit, or ``""``."""
    limit = method.ambiguous_above_percent
    if limit is None or not fat_values:
        return ""
    values = np.concatenate(fat_values)
    values = values[np.isfinite(values)] * 100
    if values.size == 0:
        return ""
    share = float(np.mean(values >= limit - _NEAR_LIMIT_POINTS))
    if share <= _NEAR_LIMIT_SHARE:
        return ""
    return (f"{share * 100:.0f} % of the voxels read within {_NEAR_LIMIT_POINTS:g} points of the {limit:g} % limit "
            f"of {method.code.meaning}: part of this muscle may be more than {limit:g} % fat, which this method "
            "reads as less")


def _fat_result(
    muscle: Muscle, fat_values: list[np.ndarray], intensities: list[np.ndarray], source: FatSource | None
) -> FatResult | None:
    if source is None:
        return None
    if source.cluster is None:
        summary = summarise_fraction(np.concatenate(fat_values)) if fat_values else None
        if summary is None:
            return None
        return FatResult(source.method, source.method.quantity, summary.mean_percent, summary.median_percent,
                         source.erode, summary.voxels, note=_near_limit_note(source.method, fat_values))
    unreliable = fat_unreliable_reason(source.cluster, muscle)
    reliable = unreliable is None
    try:
        clustered = cluster_fat(intensities, source.cluster)
    except ValueError as exc:
        return FatResult(source.cluster, source.cluster.quantity, None, None, False,
                         int(sum(v.size for v in intensities)), reliable=reliable, note=str(exc))
    return FatResult(
        source.cluster, source.cluster.quantity, clustered.fat_percent, None, False, clustered.voxels,
        intermediate_percent=clustered.intermediate_percent, reliable=reliable,
        note="" if reliable else f"{unreliable}: shown for completeness ({CITATION_WESSELINK_2024})",
    )


def measure(
    label_map: LabelMap,
    fat: FatSource | None = None,
    level_of: LevelAssigner | None = None,
    exclude: Collection[int] = (),
    key_frames: Mapping[str, int] | None = None,
    level_ranges: Sequence[str] = (),
) -> list[MuscleMetrics]:
    """Metrics of every muscle in a label map, per side and both sides, overall and per level.

    Parameters
    ----------
    label_map : LabelMap
        Labels on the source grid, with their meaning.
    fat : FatSource, optional
        Where fat comes from; without it, no fat metrics.
    level_of : callable, optional
        Vertebral level of a frame; without it, only the group ``"all"``.
    exclude : collection of int
        Frames that enter no metric (excluded by :mod:`inference.segmentation_quality`). A
        volume whose range of frames has an excluded frame inside it is not given (None): the
        gap would be counted as no muscle.
    key_frames : mapping of str to int, optional
        Each disc level's key slice, the frame nearest the middle of the disc
        (:meth:`inference.vertebrae.SeriesLevels.key_frames`): that level's metrics carry the
        muscle on that frame as ``key_slice`` (its cross-sectional area and fat there).
    level_ranges : sequence of str
        Ranges of bodies such as ``"L3-L5"`` (:data:`reports.levels.LEVEL_RANGES`) measured as
        groups of their own, named so, where the series has a slice at every body and disc of
        the range (:func:`reports.levels.range_members`; the frames quality control excluded
        count for that, not for the metrics): the range's volume, mean CSA and fat, as the
        published references measured them.

    Returns
    -------
    list of MuscleMetrics
        Ordered by muscle (canonical order), level (``"all"`` first), side (left, right, both).
    """
    series = label_map.series
    spacing = _stack_spacing(series)
    levels = {i: (level_of(g) if level_of else None) for i, g in enumerate(series.geometry)}
    fractions = _fraction_frames(label_map, fat) if fat is not None else None
    excluded = set(exclude)
    groups: dict[str, list[int]] = {ALL_LEVELS: [i for i in range(len(series)) if i not in excluded]}
    for index, level in levels.items():
        if level and index not in excluded:
            groups.setdefault(level, []).append(index)
    present = set(levels.values())
    for levels_range in level_ranges:
        members = range_members(levels_range)
        frames = [i for i, level in levels.items() if level in members and i not in excluded]
        if present.issuperset(members) and frames:
            groups[levels_range] = frames

    results: list[MuscleMetrics] = []
    for muscle in Muscle:
        sides = {
            side: tuple(v for v, info in label_map.meaning.items() if info.muscle == muscle and info.side in side.sides)
            for side in Laterality
        }
        if not any(sides.values()):
            continue
        for level, frames in groups.items():
            found = {}
            for side, values in sides.items():
                if values:
                    metrics = _group_metrics(label_map, muscle, side, values, frames, level, levels, spacing,
                                             fractions, fat, excluded)
                    if metrics is not None:
                        found[side] = metrics
            key = (key_frames or {}).get(level)
            if key is not None:
                for side, metrics in found.items():
                    at_key = next((s for s in metrics.slices if s.frame_index == key), None)
                    found[side] = replace(metrics, key_slice=at_key)
            if all(side in found for side in Laterality):
                left, right = found[Laterality.LEFT].mean_csa_mm2, found[Laterality.RIGHT].mean_csa_mm2
                asymmetry = (right - left) / ((right + left) / 2) * 100
                found[Laterality.BOTH] = replace(found[Laterality.BOTH], asymmetry_percent=asymmetry)
            results.extend(found[side] for side in Laterality if side in found)
    return results
