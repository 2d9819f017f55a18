"""Fine-tune a model from a site's DICOM SEGs: corrected node output or manual segmentations.

What it reads: folders or files holding DICOM SEG objects (BINARY, FRACTIONAL or label-map
SEGs, as :func:`highdicom.seg.segread` reads them) together with their source images, found in
the same folders by SOP Instance UID. Each SEG gives one :class:`~.data.Case`: the source
series' frames as the image volume, the SEG's frames mapped onto the model's label values as
the labels, on the source geometry (voxel ``(i, j, k)`` is column ``i``, row ``j`` of the
``k``-th frame of a stack along its normal; the affine maps it to DICOM LPS millimetres, stored
as a NIfTI-style RAS affine so that the training code reads it as it reads NIfTI cases). Other
series of the same study and frame of reference whose frames lie exactly on the source frames
and that are another Dixon component (water, fat, in-phase) join the case as further contrasts.

How segments are mapped: by the Segmented Property Type code (a :class:`~inference.vocabulary.
Muscle` code) or, where the property type is a generic one, by a muscle code in the Anatomic
Region Sequence, and by laterality from the property type's or the anatomic region's modifier
(SNOMED CT Left or Right; the old designator SRT counts as SCT). A segment that maps onto no
label value of the model, two segments onto one value, or a label that lies on the other side
of the midline than its name says, are refused with :class:`FinetuneError`.

How it is split and measured: by patient (PatientID) where there are several (a fraction of
the patients held out, all their slices); with a single patient a contiguous block of slices
in the middle of each case is held out, and the card says that the Dice is not across
patients. The held-out slices never enter training. Dice per label is measured on them, through
the exported ONNX file, for the new model and for the base model alike.

Where training starts: from the current model's weights. The bundled ONNX file carries no torch
checkpoint; its card describes the network (``training.network``: a MONAI 2D UNet), which is
built and loaded from the ONNX initializers (:func:`network_from_onnx`); the mapping is checked
by running both on the same random input (the largest difference is written on the card).

Needs the ``[train]`` extra (torch, MONAI) and highdicom.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.card import LabelInfo, ModelCard
from inference.geometry import GeometryError, SeriesImage, read_series
from inference.vocabulary import Muscle, Side

from .data import CONTRASTS, Case, DataError, SliceLayout, check_label_sides, labelled_slices, side_swap
from .onnx_weights import WeightsError, network_from_onnx, onnx_state_dict  # noqa: F401  (public here too)

__all__ = [
    "FinetuneError",
    "SegCase",
    "Split",
    "case_from_seg",
    "find_dicom",
    "finetune",
    "holdout_dice",
    "load_seg_cases",
    "map_segments",
    "network_from_onnx",
    "next_version",
    "split_cases",
]

log = logging.getLogger("inference.training")

#: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
#: Coding scheme designators taken as one: SRT is SNOMED CT's designator before 2019.
_SCHEMES = {"SRT": "SCT", "SNM3": "SCT"}
#: Frames of another series count as lying on a source frame within this distance (mm).
_POSITION_TOLERANCE_MM = 0.01

#: ``contrast_of(series, header)``: the Dixon component a series holds (water, fat, in_phase),
#: or None when its headers do not say. The node passes its selection rules' reading.
ContrastOf = Callable[[SeriesImage, Dataset], "str | None"]


class FinetuneError(ValueError):
    """The SEGs, their source images or the base model cannot be used for fine-tuning."""


# ---------------------------------------------------------------------------------------------
# Finding the files


@dataclass
class DicomIndex:
    """Headers of the DICOM files under some paths.

    Attributes
    ----------
    segs : list of Path
        Files that are SEG objects.
    instances : dict of str to Path
        SOP Instance UID to file, for every other DICOM file.
    headers : dict of str to Dataset
        SOP Instance UID to its header (pixels not read).
    """

    segs: list[Path] = field(default_factory=list)
    instances: dict[str, Path] = field(default_factory=dict)
    headers: dict[str, Dataset] = field(default_factory=dict)

    def series(self, series_uid: str) -> list[str]:
        """SOP Instance UIDs of one series among the non-SEG files."""
        return [uid for uid, ds in self.headers.items() if str(ds.get("SeriesInstanceUID", "")) == series_uid]


def find_dicom(paths: Iterable[str | Path]) -> DicomIndex:
    """Read the headers of every DICOM file in the given files and folders (recursively).

    Files that are not DICOM are skipped.

    Raises
    ------
    FinetuneError
        When a path does not exist.
    """
    index = DicomIndex()
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FinetuneError(f"{path} does not exist")
    for file in dict.fromkeys(files):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom raises several types for files that are not DICOM
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            continue
        if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
            index.segs.append(file)
        else:
            index.instances.setdefault(uid, file)
            index.headers.setdefault(uid, ds)
    return index


# ---------------------------------------------------------------------------------------------
# Segments to label values


def _code(item: Dataset) -> tuple[str, str]:
    scheme = str(item.get("CodingSchemeDesignator", ""))
    return str(item.get("CodeValue", "")), _SCHEMES.get(scheme, scheme)


def _muscle(item: Dataset) -> Muscle | None:
    return next((m for m in Muscle if _code(item) == (m.code.value, m.code.scheme_designator)), None)


def _side(items: Iterable[Dataset]) -> Side | None:
    for item in items:
        for side in Side:
            if _code(item) == (side.code.value, side.code.scheme_designator):
                return side
    return None


def _describe(item: Dataset) -> str:
    kind = item.SegmentedPropertyTypeCodeSequence[0] if "SegmentedPropertyTypeCodeSequence" in item else Dataset()
    regions = [f"{r.get('CodeMeaning', '?')} ({'/'.join(_code(r))})" for r in item.get("AnatomicRegionSequence", [])]
    return (f"segment {int(item.SegmentNumber)} {str(item.get('SegmentLabel', ''))!r}: property type "
            f"{kind.get('CodeMeaning', '?')} ({'/'.join(_code(kind))})"
            + (f", anatomic region {', '.join(regions)}" if regions else ""))


def map_segments(seg: Dataset, labels: Mapping[int, LabelInfo], where: str = "SEG") -> dict[int, int]:
    """``{segment number: label value}`` for every segment of a SEG.

    A segment's muscle is its Segmented Property Type when that is a :class:`Muscle` code, else a
    :class:`Muscle` code of its Anatomic Region Sequence; its side the SNOMED CT Left or Right in
    the property type's modifier (as the node writes it) or the anatomic region's modifier.

    Parameters
    ----------
    seg : Dataset
        The SEG (its SegmentSequence is read).
    labels : mapping of int to LabelInfo
        The model's label values and their meaning.
    where : str
        Names the SEG in messages.

    Raises
    ------
    FinetuneError
        Naming every segment that has no muscle or side of the vocabulary, or whose muscle and
        side the model has no label value for, and any label value two segments map onto.
    """
    by_meaning = {(info.muscle, info.side): value for value, info in labels.items()}
    mapping: dict[int, int] = {}
    problems = []
    for item in seg.SegmentSequence:
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        regions = list(item.get("AnatomicRegionSequence", []))
        muscle = _muscle(kind) or next((m for r in regions if (m := _muscle(r)) is not None), None)
        side = _side([*kind.get("SegmentedPropertyTypeModifierCodeSequence", []),
                      *[m for r in regions for m in r.get("AnatomicRegionModifierSequence", [])]])
        if muscle is None or side is None:
            missing = " and ".join(w for w, v in (("muscle", muscle), ("laterality (Left or Right)", side)) if v is None)
            problems.append(f"{_describe(item)} has no {missing} of musclenode's vocabulary")
            continue
        value = by_meaning.get((muscle, side))
        if value is None:
            problems.append(f"{_describe(item)} is the {side} {muscle.words}, which the model has no label for")
            continue
        if value in mapping.values():
            problems.append(f"{_describe(item)}: a second segment of the {side} {muscle.words}")
            continue
        mapping[int(item.SegmentNumber)] = value
    if problems:
        known = "; ".join(f"{v} {info.name}" for v, info in sorted(labels.items()))
        raise FinetuneError(f"{where}: cannot map " + "; ".join(problems) + f" (the model's labels: {known})")
    return mapping


# ---------------------------------------------------------------------------------------------
# One SEG to one case


@dataclass
class SegCase:
    """A case built from one SEG and its source series (and sibling Dixon components).

    Attributes
    ----------
    case : Case
        Volumes ``[columns, rows, frames]`` (voxel ``(i, j, k)``: column, row, frame of the stack
        in order along its normal), labels on the same grid, affine voxel to RAS mm (DICOM LPS
        with x and y negated), laid out along the card's ``array_axes``.
    patient_id : str
        PatientID of the source series ("" when absent).
    seg_uid, series_uid, study_uid : str
        SOP Instance UID of the SEG, Series and Study Instance UID of its source series.
    contrast_series : dict of str to str
        Contrast to the Series Instance UID it came from.
    frames : int
        Frames of the source series used.
    """

    case: Case
    patient_id: str
    seg_uid: str
    series_uid: str
    study_uid: str
    contrast_series: dict[str, str]
    frames: int


def _stack_affine(series: SeriesImage, stack: Sequence[int]) -> np.ndarray:
    """Voxel ``(column, row, frame)`` to RAS mm of one stack (frames in stack order)."""
    first = series.geometry[stack[0]]
    offsets = series.stack_offsets(series.stacks.index(tuple(stack)))
    step = float(np.median(np.diff(offsets))) if len(offsets) > 1 else float(first.slice_thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(first.row_cosine) * first.pixel_spacing[1]
    lps[:3, 1] = np.asarray(first.column_cosine) * first.pixel_spacing[0]
    lps[:3, 2] = first.normal * (step if step > 0 else 1.0)
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _seg_labels(seg: Any, series: SeriesImage, stack: Sequence[int], lookup: np.ndarray, where: str) -> np.ndarray:
    """Label values ``[frames, rows, columns]`` of a stack's frames, from the SEG's frames."""
    try:
        planes = []
        singles = [series.geometry[i] for i in stack]
        if all(g.frame_number <= 1 for g in singles) and len({g.sop_instance_uid for g in singles}) == len(singles):
            pixels = seg.get_pixels_by_source_instance(
                [g.sop_instance_uid for g in singles], combine_segments=True, relabel=False,
                assert_missing_frames_are_empty=True, dtype=np.uint16)
            planes = list(pixels)
        else:
            for g in singles:
                pixels = seg.get_pixels_by_source_frame(
                    g.sop_instance_uid, [g.frame_number], combine_segments=True, relabel=False,
                    assert_missing_frames_are_empty=True, dtype=np.uint16)
                planes.append(pixels[0])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise FinetuneError(f"{where}: its frames cannot be placed on the source frames: {exc}") from None
    stacked = np.stack(planes).astype(np.int64)
    if stacked.shape[1:] != series.geometry[stack[0]].shape:
        raise FinetuneError(f"{where}: SEG frames of {stacked.shape[1:]} pixels on source frames of "
                            f"{series.geometry[stack[0]].shape}")
    return lookup[np.clip(stacked, 0, len(lookup) - 1)]


def _sibling_volumes(index: DicomIndex, series: SeriesImage, stack: Sequence[int], header: Dataset,
                     contrast_of: ContrastOf, taken: set[str]) -> dict[str, tuple[str, np.ndarray]]:
    """Other Dixon components of the acquisition whose frames lie exactly on the stack's frames."""
    found: dict[str, tuple[str, np.ndarray]] = {}
    study, frame_of_reference = str(header.get("StudyInstanceUID", "")), series.frame_of_reference_uid
    by_series: dict[str, list[str]] = {}
    for uid, ds in index.headers.items():
        if (str(ds.get("StudyInstanceUID", "")) == study and str(ds.get("FrameOfReferenceUID", "")) == frame_of_reference
                and str(ds.get("SeriesInstanceUID", "")) != series.series_instance_uid):
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append(uid)
    for series_uid, uids in sorted(by_series.items()):
        try:
            other = read_series([index.instances[u] for u in uids])
        except GeometryError:
            continue
        contrast = contrast_of(other, index.headers[uids[0]])
        if contrast not in CONTRASTS or contrast in taken or contrast in found:
            continue
        planes = []
        for i in stack:
            g = series.geometry[i]
            match = [k for k, o in enumerate(other.geometry)
                     if o.same_grid(g) and np.linalg.norm(np.subtract(o.position, g.position)) <= _POSITION_TOLERANCE_MM]
            if not match:
                break
            planes.append(other.frames[match[0]])
        else:
            found[contrast] = (series_uid, np.stack(planes))
    return found


def case_from_seg(seg_path: str | Path, index: DicomIndex, labels: Mapping[int, LabelInfo],
                  contrast_of: ContrastOf, array_axes: Sequence[str] = ("P", "L"),
                  siblings: bool = True) -> list[SegCase]:
    """The cases of one SEG: one per stack (orientation and grid) of its source series.

    Parameters
    ----------
    seg_path : path-like
        The SEG file.
    index : DicomIndex
        Where its source instances (and sibling components) are looked up by SOP Instance UID.
    labels : mapping of int to LabelInfo
        The model's label values (:func:`map_segments`).
    contrast_of : callable
        ``(series, header) -> "water" | "fat" | "in_phase" | None``.
    array_axes : sequence of two str
        The card's layout of slices.
    siblings : bool
        Add other Dixon components of the acquisition that lie on the same frames.

    Raises
    ------
    FinetuneError
        When the SEG references no images, images of several series, images that are not in
        the index (naming how many and the first missing SOP Instance UID), a series whose
        contrast is unknown, segments that cannot be mapped, or labels on the wrong side.
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    where = str(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as exc:  # noqa: BLE001 - highdicom raises several types for malformed SEGs
        raise FinetuneError(f"{where}: not a SEG highdicom can read: {exc}") from None
    where = f"SEG {seg_path.name} ({seg.SOPInstanceUID})"
    mapping = map_segments(seg, labels, where)
    references = seg.get_source_image_uids()
    if not references:
        raise FinetuneError(f"{where}: references no source images")
    series_uids = sorted({str(r[1]) for r in references})
    if len(series_uids) != 1:
        raise FinetuneError(f"{where}: references images of {len(series_uids)} series; one SEG per series is supported")
    sops = list(dict.fromkeys(str(r[2]) for r in references))
    missing = [uid for uid in sops if uid not in index.instances]
    if missing:
        raise FinetuneError(
            f"{where}: {len(missing)} of its {len(sops)} source images (series {series_uids[0]}) are not in the "
            f"given paths; first missing SOP Instance UID {missing[0]}. Put the source series beside the SEG.")
    try:
        series = read_series([index.instances[uid] for uid in sops])
    except GeometryError as exc:
        raise FinetuneError(f"{where}: its source series cannot be read: {exc}") from None
    header = index.headers[sops[0]]
    contrast = contrast_of(series, header)
    if contrast not in CONTRASTS:
        raise FinetuneError(
            f"{where}: cannot tell which Dixon component (one of {', '.join(CONTRASTS)}) its source series "
            f"{series.series_description!r} ({series.series_instance_uid}) is: its headers do not say"
            + (f" (read {contrast!r})" if contrast else ""))
    lookup = np.zeros(max(mapping) + 1, np.int16)
    for number, value in mapping.items():
        lookup[number] = value
    cases = []
    for number, stack in enumerate(series.stacks):
        volume = np.stack([series.frames[i] for i in stack]).transpose(2, 1, 0).astype(np.float32)
        label_volume = _seg_labels(seg, series, stack, lookup, where).transpose(2, 1, 0).astype(np.int16)
        affine = _stack_affine(series, stack)
        images = {contrast: volume}
        contrast_series = {contrast: series.series_instance_uid}
        if siblings:
            for other, (uid, planes) in _sibling_volumes(index, series, stack, header, contrast_of, {contrast}).items():
                images[other] = planes.transpose(2, 1, 0).astype(np.float32)
                contrast_series[other] = uid
        try:
            layout = SliceLayout.from_affine(affine, array_axes)
        except DataError as exc:
            raise FinetuneError(f"{where}: {exc}") from None
        if layout.slice_axis != 2:
            raise FinetuneError(f"{where}: its frames are not cut across the card's {'/'.join(array_axes)} plane "
                                "(not axial for an axial model)")
        # The SEG's UID ends the name: two SEGs of one file name (in two folders) stay apart.
        name = f"{seg_path.stem}-{str(seg.SOPInstanceUID)[-8:]}" + (f"-stack{number + 1}" if len(series.stacks) > 1 else "")
        case = Case(name, images, label_volume, affine, layout, {"labels": seg_path})
        _check_sides(case, labels, where)
        if not labelled_slices(case):
            continue
        cases.append(SegCase(case, str(header.get("PatientID", "")), str(seg.SOPInstanceUID), series.series_instance_uid,
                             str(header.get("StudyInstanceUID", "")), contrast_series, len(stack)))
    if not cases:
        raise FinetuneError(f"{where}: none of its frames holds a segment")
    return cases


def _check_sides(case: Case, labels: Mapping[int, LabelInfo], where: str) -> None:
    """Every muscle labelled on both sides lies on the side its segment says (LPS x)."""
    present = {int(v) for v in np.unique(case.labels) if v}
    pairs = {v: info for v, info in labels.items() if v in present}
    try:
        swap = side_swap(labels)
    except DataError:
        return
    checked = {v: info for v, info in pairs.items() if swap.get(v) in present}
    if checked:
        try:
            check_label_sides(case.labels, case.affine, checked)
        except DataError as exc:
            raise FinetuneError(f"{where}: {exc}; its segments name the wrong side") from None


def load_seg_cases(paths: Iterable[str | Path], labels: Mapping[int, LabelInfo], contrast_of: ContrastOf,
                   array_axes: Sequence[str] = ("P", "L")) -> list[SegCase]:
    """Every case of every SEG under ``paths`` (:func:`case_from_seg`).

    Raises
    ------
    FinetuneError
        When there is no SEG, or any SEG cannot be used (all problems named at once).
    """
    paths = list(paths)
    index = find_dicom(paths)
    if not index.segs:
        raise FinetuneError(f"no DICOM SEG among {len(index.instances)} DICOM files in {', '.join(map(str, paths))}")
    cases, problems = [], []
    for path in index.segs:
        try:
            cases.extend(case_from_seg(path, index, labels, contrast_of, array_axes))
        except FinetuneError as exc:
            problems.append(str(exc))
    if problems:
        raise FinetuneError("; ".join(problems))
    return cases


# ---------------------------------------------------------------------------------------------
# Split


@dataclass(frozen=True)
class Split:
    """Which slices of which case are held out.

    Attributes
    ----------
    by : str
        ``"patient"`` (held-out patients, all their slices) or ``"slices"`` (one patient: a
        contiguous block of slices of each case).
    held_out : dict of int to list of int
        Case index to held-out slice indices (along the case's slice axis).
    patients_trained, patients_held_out : list of str
        Patient keys (:func:`patient_key`).
    note : str
        What the split means for the Dice measured on it.
    """

    by: str
    held_out: dict[int, list[int]]
    patients_trained: list[str]
    patients_held_out: list[str]
    note: str


def patient_key(patient_id: str) -> str:
    """A pseudonym of a PatientID for the card: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:12]


def split_cases(cases: Sequence[SegCase], fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out patients (by PatientID), or with one patient a block of slices.

    Parameters
    ----------
    cases : sequence of SegCase
    fraction : float
        Share of the patients (at least one, and one fewer than all) or, with a single patient,
        of each case's labelled slices (at least one, a contiguous block in the middle).
    seed : int
        Chooses the held-out patients.

    Raises
    ------
    FinetuneError
        When there is nothing left to train on or to measure.
    """
    if not 0 < fraction < 1:
        raise FinetuneError(f"the held-out fraction must lie between 0 and 1, not {fraction}")
    patients = sorted({c.patient_id for c in cases})
    if len(patients) > 1:
        count = min(len(patients) - 1, max(1, round(fraction * len(patients))))
        chosen = sorted(np.random.default_rng(seed).choice(len(patients), size=count, replace=False))
        held = {patients[i] for i in chosen}
        held_out = {n: labelled_slices(c.case) for n, c in enumerate(cases) if c.patient_id in held}
        return Split("patient", held_out, [patient_key(p) for p in patients if p not in held],
                     [patient_key(p) for p in sorted(held)],
                     f"held out {len(held)} of {len(patients)} patients (all their slices): Dice across patients")
    held_out = {}
    for n, c in enumerate(cases):
        slices = labelled_slices(c.case)
        if len(slices) < 2:
            raise FinetuneError(f"{c.case.name}: {len(slices)} labelled slice(s); a single patient needs at least 2 "
                                "to hold some out")
        block = min(len(slices) - 1, max(1, round(fraction * len(slices))))
        start = (len(slices) - block) // 2
        held_out[n] = slices[start:start + block]
    key = [patient_key(patients[0])]
    return Split("slices", held_out, key, key,
                 "a single patient: a contiguous block of slices in the middle of each series was held out; "
                 "the Dice is measured on this patient's other slices, NOT across patients, and neighbouring "
                 "slices look alike, so it is optimistic")


# ---------------------------------------------------------------------------------------------
# Measuring


def holdout_dice(card: ModelCard, cases: Sequence[SegCase], split: Split, threads: int = 1,
                 onnx_path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Dice per contrast and label over the held-out slices, voxels of all cases pooled.

    Each slice is segmented as :func:`.evaluate.segment_slice` does (the card's layout, spacing,
    windows, largest component) and compared with the SEG's labels on the source grid.

    Returns
    -------
    dict
        ``{contrast: {str(label value): Dice}}``, Dice in [0, 1] (NaN where a label is absent
        from both); only contrasts the card accepts and some held-out case has.
    """
    from .evaluate import SlidingWindowPredictor, segment_slice

    predictor = SlidingWindowPredictor(card, onnx_path, threads=threads)
    results: dict[str, dict[str, float]] = {}
    for contrast in card.contrasts:
        sums = {v: [0, 0] for v in card.output_labels}
        measured = False
        for number, slices in split.held_out.items():
            case = cases[number].case
            if contrast not in case.contrasts:
                continue
            volume = case.volume(contrast)
            for index in slices:
                predicted = segment_slice(predictor, case.layout.slice(volume, index), case.layout.spacing_mm)
                truth = case.layout.slice(case.labels, index)
                for value in sums:
                    p, t = predicted == value, truth == value
                    sums[value][0] += int((p & t).sum())
                    sums[value][1] += int(p.sum()) + int(t.sum())
                measured = True
        if measured:
            results[str(contrast)] = {str(v): (round(2 * a / b, 4) if b else float("nan")) for v, (a, b) in sums.items()}
    return results


# ---------------------------------------------------------------------------------------------
# The whole run


def next_version(base: ModelCard, existing: Iterable[ModelCard]) -> str:
    """``BASE+site.N``: the base's public version and one more than the highest N of that name."""
    public = base.version.split("+")[0]
    numbers = [0]
    for card in existing:
        if card.name == base.name and card.version.startswith(public + "+site."):
            tail = card.version[len(public) + 6:]
            if tail.isdigit():
                numbers.append(int(tail))
    return f"{public}+site.{max(numbers) + 1}"


def finetune(base: ModelCard, seg_paths: Sequence[str | Path], out: str | Path, contrast_of: ContrastOf, *,
             version: str | None = None, existing: Iterable[ModelCard] = (), epochs: int = 10,
             samples_per_epoch: int = 128, batch_size: int = 8, learning_rate: float = 2e-4,
             holdout_fraction: float = 0.2, seed: int = 20240612, threads: int = 1,
             time_limit_min: float | None = None, software_version: str = "",
             command: str = "") -> ModelCard:
    """Fine-tune ``base`` on the SEGs under ``seg_paths`` and write the new model and card to ``out``.

    Files written: ``NAME-VERSION.onnx`` and its card ``NAME-VERSION.json`` (same name as the
    base, a new version; the loss per epoch is in the card's ``training.history``). Nothing
    else goes into ``out``, since the registry reads every JSON file there as a card.

    Parameters
    ----------
    base : ModelCard
        The current model; its card must describe its network (:func:`network_from_onnx`).
    seg_paths : sequence of path-like
        Files and folders holding the SEGs and their source series.
    out : path-like
        Folder of the new model (one of the registry's ``model.dirs`` to be found by the node).
    contrast_of : callable
        ``(series, header) -> contrast``: the Dixon component of a series.
    version : str, optional
        Version of the new model; default :func:`next_version`.
    existing : iterable of ModelCard
        Cards already known (for the default version).
    epochs, samples_per_epoch, batch_size, learning_rate, seed, time_limit_min
        As :func:`.train.fit` and :mod:`.train` take them; the learning rate is lower than for
        training from scratch, as fits a start from trained weights.
    holdout_fraction : float
        :func:`split_cases`.
    threads : int
        torch and ONNX Runtime threads.
    software_version, command : str
        Recorded on the card.

    Returns
    -------
    ModelCard
        The new card as loaded back from ``out``.

    Raises
    ------
    FinetuneError
        When the SEGs, their images or the base model cannot be used (see :func:`case_from_seg`,
        :func:`split_cases`, :func:`network_from_onnx`).
    """
    import torch
    from monai.data import DataLoader, Dataset as MonaiDataset
    from monai.utils import set_determinism

    from . import export
    from .augment import training_transforms
    from .train import _augmentation_summary, _cpu_name, _version, fit, training_items

    existing = list(existing)
    if version is not None and not re.fullmatch(r"[A-Za-z0-9_.+!-]{1,64}", version):
        raise FinetuneError(f"version {version!r}: use letters, digits and . _ + ! - (as model.name's @VERSION)")
    taken = [c for c in [base, *existing] if c.name == base.name and c.version == version]
    if taken:
        raise FinetuneError(f"model {base.name} {version} exists already ({taken[0].path}); choose another --version")
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    torch.set_num_threads(threads)
    set_determinism(seed=seed)
    if base.normalisation.get("method") != "zscore_nonzero" or base.crop_foreground or base.channels != 1 \
            or list(base.output_labels) != sorted(base.labels):
        raise FinetuneError(f"model {base.name} {base.version}: only single-channel models with zscore_nonzero "
                            "normalisation, no foreground crop and every output described can be fine-tuned")
    # The data first: a SEG that cannot be used is refused before any time goes into the network.
    cases = load_seg_cases(seg_paths, base.labels, contrast_of, base.array_axes)
    split = split_cases(cases, holdout_fraction, seed)
    try:
        network, config, mapping_difference = network_from_onnx(base)
    except WeightsError as exc:
        raise FinetuneError(str(exc)) from exc
    log.info("%d SEG case(s), split by %s: %s", len(cases), split.by, split.note)

    items = []
    for number, seg_case in enumerate(cases):
        items.extend(training_items([seg_case.case], set(split.held_out.get(number, []))))
    if not items:
        raise FinetuneError("no training slices left after the hold-out")
    contrasts = sorted({c for sc in cases for c in sc.case.contrasts} & set(base.contrasts))
    weights = {c: w for c, w in {"water": 0.5, "fat": 0.25, "in_phase": 0.25}.items() if c in contrasts}
    if not weights:
        raise FinetuneError(f"the SEGs' images are {sorted({c for sc in cases for c in sc.case.contrasts})}; "
                            f"model {base.name} accepts {', '.join(base.contrasts)}")
    transforms = training_transforms(base.window, side_swap(base.labels), weights)
    transforms.set_random_state(seed=seed)
    samples = [items[i % len(items)] for i in range(max(samples_per_epoch, batch_size))]
    loader = DataLoader(MonaiDataset(samples, transforms), batch_size=batch_size, shuffle=True, num_workers=0,
                        drop_last=True)
    history: list[dict] = []
    outcome = fit(network, loader, epochs, learning_rate, time_limit_min * 60 if time_limit_min else None, history)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    version = version or next_version(base, [base, *existing])
    stem = f"{base.name}-{version}"
    onnx_path = out / f"{stem}.onnx"
    export.export_onnx(network, onnx_path, base.window)
    export_difference = export.compare_with_torch(network, onnx_path, (2, 1, base.window[0] + 32, base.window[1]))

    patients = sorted({c.patient_id for c in cases})
    provenance = {
        "base_model": {"name": base.name, "version": base.version, "sha256": base.sha256},
        "fine_tuned_from": "the base model's weights, read from its ONNX file into the network its card describes "
                           f"(largest difference ONNX Runtime vs torch {mapping_difference:.1e})",
        "data": {
            "kind": "DICOM SEG objects of this site with their source series (corrected node output or manual)",
            "seg_instances": len({c.seg_uid for c in cases}),
            "source_series": len({c.series_uid for c in cases}),
            "studies": len({c.study_uid for c in cases}),
            "patients": len(patients),
            "patient_keys": [patient_key(p) for p in patients],
            "seg_uids": sorted({c.seg_uid for c in cases}),
            "series_uids": sorted({u for c in cases for u in c.contrast_series.values()}),
            "series_per_contrast": {c: sum(1 for sc in cases if c in sc.case.images) for c in CONTRASTS},
            "frames": sum(c.frames for c in cases),
        },
        "date": started.isoformat(timespec="seconds"),
        "software": {"musclenode": software_version, "torch": torch.__version__, "monai": _version("monai"),
                     "python": platform.python_version()},
    }
    split_record = {
        "by": split.by,
        "note": split.note,
        "held_out": {cases[n].case.name: list(map(int, s)) for n, s in split.held_out.items()},
        "patients_trained": split.patients_trained,
        "patients_held_out": split.patients_held_out,
        "fraction": holdout_fraction,
        "seed": seed,
    }
    training = {
        "purpose": f"fine-tuned for this site from {base.name} {base.version}",
        "command": command,
        "network": {**config.as_dict(), "parameters": sum(p.numel() for p in network.parameters())},
        "slices_trained": len(items),
        "split": split_record,
        "contrast_weights": weights,
        "augmentation": _augmentation_summary(),
        "loss": "DiceCELoss (softmax, Dice without background, batch Dice)",
        "optimiser": f"AdamW lr {learning_rate} weight decay 1e-4, warm-up then cosine",
        "epochs": epochs, "samples_per_epoch": len(samples), "batch_size": batch_size,
        **outcome,
        "history": history,
        "hardware": f"{_cpu_name()}, {threads} torch threads, no GPU",
        "onnx_vs_torch_max_abs_difference": export_difference,
        "limitations": [
            "trained on the SEGs given: as good as their corrections, on as many patients as they cover",
            split.note,
            f"the base model's own training data are not re-used: {base.name} {base.version} may forget "
            "what these SEGs do not show",
        ],
    }
    card = export.write_card(out / f"{stem}.json", onnx_path, name=base.name, version=version, labels=base.labels,
                             window=base.window, array_axes=base.array_axes, spacing_mm=base.spacing_mm,
                             contrasts=base.contrasts, overlap=base.overlap, licence=base.licence,
                             provenance=provenance, training=training, accuracy={})
    group = "held_out_patients" if split.by == "patient" else "held_out_slices"
    new_dice = holdout_dice(card, cases, split, threads)
    base_dice = holdout_dice(base, cases, split, threads)
    accuracy = {
        "metric": "Dice",
        "description": (f"Dice per label on the held-out data of the fine-tuning SEGs ({split.note}), "
                        "through the exported ONNX file; base_model_dice is the base model on the same slices"),
        "split": split.by,
        "held_out_slices": sum(len(s) for s in split.held_out.values()),
        "method": "slices laid out as the card says, windows blended, largest component per label; Dice on the "
                  "source grid, voxels of all held-out slices pooled per label",
        "dice": {c: {group: d} for c, d in new_dice.items()},
        "base_model_dice": {c: {group: d} for c, d in base_dice.items()},
    }
    training["minutes"] = round((time.monotonic() - clock) / 60, 1)
    card = export.write_card(out / f"{stem}.json", onnx_path, name=base.name, version=version, labels=base.labels,
                             window=base.window, array_axes=base.array_axes, spacing_mm=base.spacing_mm,
                             contrasts=base.contrasts, overlap=base.overlap, licence=base.licence,
                             provenance=provenance, training=training, accuracy=accuracy)
    return card

