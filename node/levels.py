"""Vertebral levels of the axial slices of studies in folders (``musclenode levels PATH...``).

For every study found under the paths: the sagittal reference series is chosen (slice normal
along the patient's left-right axis; T2 preferred, then T1, then any other, by the node's own
selection rule :func:`node.orchestration.rules.level_reference`; among equals the one with most
frames), the level model finds and names its vertebral bodies (:func:`inference.vertebrae.find_bodies`)
and every axial series of the study (slice normal within ``max_tilt_degrees`` of the head-foot
axis) gets the level of each frame (:func:`inference.vertebrae.assign_levels`, which also refuses
series in another frame of reference). Without a sagittal series, every axial frame is listed
with no level and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pydicom
from pydicom.errors import InvalidDicomError

from inference.card import ModelCard
from inference.geometry import MAX_OBLIQUE_DEGREES, axial_tilt_degrees, read_series
from inference.vertebrae import LevelReference, SeriesLevels, assign_levels, find_bodies

from .orchestration.headers import summarise
from .orchestration.rules import SeriesHeaders, level_reference

__all__ = ["StudyLevels", "choose_reference", "find_series", "levels_as_rows", "study_levels"]


@dataclass
class _Series:
    headers: SeriesHeaders
    files: list[Path] = field(default_factory=list)

    @property
    def description(self) -> str:
        return str(self.headers.first("SeriesDescription"))


@dataclass
class StudyLevels:
    """What ``musclenode levels`` found for one study.

    Attributes
    ----------
    study_instance_uid : str
    reference : LevelReference or None
        The bodies found on the reference series (None without a sagittal series).
    reference_weighting : str
        ``"t2"``, ``"t1"`` or ``""`` (unknown) of the reference series.
    reason : str or None
        Why there is no reference.
    series : list of (SeriesLevels, list of (str, int))
        Each axial series' levels with the (SOP Instance UID, frame number) of each frame.
    """

    study_instance_uid: str
    reference: LevelReference | None
    reference_weighting: str
    reason: str | None
    series: list[tuple[SeriesLevels, list[tuple[str, int]], str]]


def find_series(paths: Iterable[str | Path]) -> dict[str, dict[str, _Series]]:
    """DICOM files under the paths, grouped by study and series (headers only, no pixels)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            for root, _, names in os.walk(path):
                files += [Path(root) / n for n in sorted(names)]
        elif path.is_file():
            files.append(path)
    grouped: dict[str, dict[str, tuple[list[dict], list[Path]]]] = {}
    for file in sorted(files):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study or not series or "ImageOrientationPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds \
                and "SharedFunctionalGroupsSequence" not in ds:
            continue
        headers, found = grouped.setdefault(study, {}).setdefault(series, ([], []))
        headers.append(summarise(ds))
        found.append(file)
    return {study: {uid: _Series(SeriesHeaders(uid, study, 1, tuple(h)), f) for uid, (h, f) in series.items()}
            for study, series in grouped.items()}


def choose_reference(series: Sequence[_Series]) -> tuple[_Series | None, str, str]:
    """The sagittal reference series, as the node's rules choose it
    (:func:`node.orchestration.rules.level_reference`): ``(series or None, weighting, reason when None)``."""
    chosen, weighting, reason = level_reference([item.headers for item in series])
    if chosen is None:
        return None, "", reason
    item = next(item for item in series if item.headers is chosen)
    return item, weighting.value if weighting is not None else "", ""


def _is_axial(item: _Series, max_tilt_degrees: float) -> bool:
    for frame in item.headers.frames:
        orientation = frame.get("orientation")
        if orientation:
            tilt = axial_tilt_degrees(orientation)
            return tilt is not None and tilt <= max_tilt_degrees
    return False


def study_levels(paths: Iterable[str | Path], card: ModelCard,
                 max_tilt_degrees: float = MAX_OBLIQUE_DEGREES) -> list[StudyLevels]:
    """Levels of every axial frame of every study under the paths (see the module's docstring)."""
    results = []
    for study, series in sorted(find_series(paths).items()):
        items = list(series.values())
        reference_series, weighting, reason = choose_reference(items)
        reference = None
        if reference_series is not None:
            reference = find_bodies(read_series(reference_series.files), card)
        out = []
        for item in sorted(items, key=lambda s: (s.headers.first("SeriesNumber", 0) or 0, s.headers.series_uid)):
            if item is reference_series or not _is_axial(item, max_tilt_degrees):
                continue
            image = read_series(item.files)
            levels = assign_levels(reference, image, reason or None)
            frames = [(g.sop_instance_uid, g.frame_number) for g in image.geometry]
            out.append((levels, frames, item.description))
        results.append(StudyLevels(study, reference, weighting, reason or None, out))
    return results


def levels_as_rows(results: Sequence[StudyLevels]) -> list[dict]:
    """One JSON-ready object per axial frame (the output of ``musclenode levels --json``)."""
    rows = []
    for study in results:
        for levels, frames, description in study.series:
            for (sop, frame_number), level in zip(frames, levels.levels):
                rows.append({
                    "study_instance_uid": study.study_instance_uid,
                    "series_instance_uid": levels.series_instance_uid,
                    "series_description": description,
                    "sop_instance_uid": sop,
                    "frame_number": frame_number,
                    "level": level,
                    "reference_series_instance_uid": study.reference.series_instance_uid if study.reference else None,
                    "reason": levels.reason,
                    # What the plain output prints under the reference: a JSON reader must see a
                    # body named by its order, or a gap, as well.
                    "bodies_found": list(study.reference.names) if study.reference else [],
                    "reference_problems": list(study.reference.problems) if study.reference else [],
                })
    return rows
