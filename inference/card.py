"""Model cards: what a segmentation model expects and what its outputs mean.

A card is a JSON file next to its ONNX file (``NAME.json`` beside ``NAME.onnx``). The runtime
reads nothing about a model from anywhere else, so a card must say everything: labels mapped onto
the canonical vocabulary, the contrasts the model accepts, how a slice is laid out, resampled and
normalised before it goes in, and how the sliding windows are placed and blended. It also says,
for people, where the model came from, under which licence, and how accurate it was on what.

The ONNX contract: input ``float32 [batch, channels, height, width]``, output
``float32 [batch, classes, height, width]`` class scores (logits or probabilities), class 0 the
background, class ``k`` the label value ``k`` of the card's ``labels`` in the order of
``output_labels``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .vocabulary import Contrast, Muscle, Side, Vertebra

__all__ = ["KIND_MUSCLES", "KIND_VERTEBRAE", "KINDS", "CardError", "LabelInfo", "ModelCard", "VertebraLabel"]

#: What a model segments. ``muscles``: paraspinal muscles on axial slices, labels are
#: :class:`LabelInfo` (the node's muscle segmentation; every card without ``kind`` is one).
#: ``vertebrae``: vertebral bodies named by level on sagittal slices, labels are
#: :class:`VertebraLabel` (the level model, :mod:`inference.vertebrae`). The registry selects a
#: model of the kind asked for, so a level model can never be picked as the muscle model.
KIND_MUSCLES = "muscles"
KIND_VERTEBRAE = "vertebrae"
KINDS = (KIND_MUSCLES, KIND_VERTEBRAE)

#: Patient directions (DICOM LPS letters and their opposites) for the axes of a 2D input array.
_DIRECTIONS = set("LRAPSI")
_NORMALISATIONS = ("zscore_nonzero", "zscore", "percentile")


class CardError(ValueError):
    """A model card is missing a field or has a value the runtime cannot use."""


@dataclass(frozen=True)
class LabelInfo:
    """What one output label value means: a muscle of the vocabulary on one side.

    Plain strings (as a card's JSON gives them) are parsed into :class:`Muscle` and :class:`Side`.
    """

    muscle: Muscle
    side: Side

    def __post_init__(self) -> None:
        object.__setattr__(self, "muscle", _member(Muscle, self.muscle, "label muscle"))
        object.__setattr__(self, "side", _member(Side, self.side, "label side"))

    @property
    def name(self) -> str:
        """``"left erector spinae"``: the SEG's segment label."""
        return f"{self.side} {self.muscle.words}"


@dataclass(frozen=True)
class VertebraLabel:
    """What one output label value of a level model means: a vertebral body of the vocabulary.

    A plain string (as a card's JSON gives it) is parsed into :class:`Vertebra`.
    """

    vertebra: Vertebra

    def __post_init__(self) -> None:
        object.__setattr__(self, "vertebra", _member(Vertebra, self.vertebra, "label vertebra"))

    @property
    def name(self) -> str:
        """``"L3 vertebral body"``."""
        return f"{self.vertebra.value} vertebral body"


def _member(kind: type, value: Any, what: str) -> Any:
    """``kind(value)``, or a CardError naming what was expected."""
    try:
        return kind(value)
    except ValueError:
        raise CardError(f"{what} {value!r} is not one of {', '.join(m.value for m in kind)}") from None


@dataclass(frozen=True)
class ModelCard:
    """A segmentation model's card.

    Attributes
    ----------
    name, version : str
        Identity; the version enters the UIDs of results.
    onnx : str
        File name of the ONNX model, relative to the card.
    sha256 : str
        Checksum of the ONNX file, checked when the model is loaded.
    labels : dict of int to LabelInfo
        Output label value to canonical muscle and side. Values not listed are ignored.
    output_labels : list of int
        Label value of each output class after the background (class ``k`` -> ``output_labels[k-1]``);
        0 for a class the node ignores (counted as background), such as the non-lumbar muscles
        of a whole-body model. Label values are 1 to 255 (label maps are 8-bit).
    contrasts : list of Contrast
        Input contrasts: with one channel, those the model accepts, preferred first; with several
        channels, one per channel, in channel order.
    channels : int
        Input channels.
    array_axes : list of two str
        Patient direction in which axis 0 (rows) and axis 1 (columns) of the input array increase,
        e.g. ``["P", "L"]`` (rows towards posterior, columns towards the patient's left: how an
        axial DICOM image is displayed) or ``["R", "A"]`` (a slice of a RAS volume, as MONAI's
        Orientation("RAS") gives it).
    spacing_mm : list of two float
        In-plane spacing of the input array, rows then columns.
    normalisation : dict
        ``{"method": "zscore_nonzero"}`` (mean and SD over non-zero pixels of the slice, as MONAI's
        NormalizeIntensity(nonzero=True)), ``{"method": "zscore"}``, or
        ``{"method": "percentile", "low": 0.5, "high": 99.5}`` (scaled to [0, 1] and clipped).
        ``"scope": "volume"`` with ``"max_slices": N`` takes the statistics (and the foreground
        crop) over chunks of N slices of a stack, as MuscleMap's volume pipeline does.
    window : list of two int
        Sliding-window size, rows then columns.
    overlap : float
        Fraction of a window shared with its neighbour, in [0, 1).
    blend : str
        ``"gaussian"`` (sigma = ``sigma_scale`` x window) or ``"constant"``.
    sigma_scale : float
        Gaussian sigma as a fraction of the window size.
    largest_component : bool
        Keep only the largest connected component of each label per slice.
    crop_foreground : bool
        Crop to the box of pixels that are positive after normalisation, plus a 20-pixel margin,
        before windowing (MuscleMap's CropForeground).
    provenance, licence, accuracy, training : dict or str
        For people: where it came from, the licence, what was measured on which data, how it was
        trained.
    kind : str
        What the model segments (:data:`KINDS`): ``"muscles"`` (labels are :class:`LabelInfo`;
        the default, so cards written before kinds existed keep their meaning) or
        ``"vertebrae"`` (labels are :class:`VertebraLabel`).
    postprocess : dict
        Settings of a kind's own post-processing, measured with the model: for a level model
        ``{"naming": "consensus", "end_plate_offset_mm": [superior, inferior]}`` (see
        :mod:`inference.vertebrae`). Empty for muscle models.
    """

    name: str
    version: str
    onnx: str
    sha256: str
    labels: dict[int, LabelInfo]
    output_labels: list[int]
    contrasts: list[Contrast]
    channels: int
    array_axes: list[str]
    spacing_mm: list[float]
    normalisation: dict[str, Any]
    window: list[int]
    overlap: float
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    largest_component: bool = True
    crop_foreground: bool = False
    licence: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND_MUSCLES
    postprocess: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not self.version:
            problems.append("name and version are required")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(KINDS)}")
        else:
            expected = LabelInfo if self.kind == KIND_MUSCLES else VertebraLabel
            if any(not isinstance(info, expected) for info in self.labels.values()):
                problems.append(f"labels of a {self.kind} model must be {expected.__name__}")
        used = [v for v in self.output_labels if v != 0]
        if len(used) != len(set(used)):
            problems.append("output_labels repeats a label value")
        if any(not 0 < v < 256 for v in self.labels) or any(not 0 <= v < 256 for v in self.output_labels):
            problems.append("label values must be 1 to 255 (0 for an ignored class)")
        missing = [v for v in self.output_labels if v not in self.labels and v != 0]
        if missing and len(missing) == len(self.output_labels):
            problems.append("no output label is described in labels")
        try:
            contrasts = [Contrast(c) for c in self.contrasts]
        except ValueError:
            contrasts = []
        if contrasts:
            object.__setattr__(self, "contrasts", contrasts)
        else:
            problems.append(f"contrasts must be among {', '.join(Contrast)}")
        if self.channels < 1:
            problems.append("channels must be at least 1")
        axes = [a.upper() for a in self.array_axes]
        if len(axes) != 2 or any(a not in _DIRECTIONS for a in axes) or _axis(axes[0]) == _axis(axes[1]):
            problems.append("array_axes must be two perpendicular directions among L, R, A, P, S, I")
        if len(self.spacing_mm) != 2 or min(self.spacing_mm) <= 0:
            problems.append("spacing_mm must be two positive numbers")
        if self.normalisation.get("method") not in _NORMALISATIONS:
            problems.append(f"normalisation.method must be one of {', '.join(_NORMALISATIONS)}")
        if len(self.window) != 2 or min(self.window) < 8:
            problems.append("window must be two sizes of at least 8")
        if not 0 <= self.overlap < 1:
            problems.append("overlap must be in [0, 1)")
        if self.blend not in ("gaussian", "constant"):
            problems.append("blend must be gaussian or constant")
        if problems:
            raise CardError(f"model card {self.name or '?'}: " + "; ".join(problems))

    @property
    def onnx_path(self) -> Path:
        if self.path is None:
            raise CardError(f"model card {self.name} was not loaded from a file")
        return self.path.parent / self.onnx

    @property
    def classes(self) -> int:
        """Output classes including the background."""
        return len(self.output_labels) + 1

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> "ModelCard":
        try:
            values = dict(data)
            label_type = VertebraLabel if data.get("kind") == KIND_VERTEBRAE else LabelInfo
            values["labels"] = {int(k): label_type(**v) for k, v in data["labels"].items()}
            values["output_labels"] = [int(v) for v in data["output_labels"]]
            values.pop("schema", None)
            return cls(**values, path=path)
        except CardError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            where = f" ({path})" if path else ""
            raise CardError(f"model card{where} is incomplete or malformed: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        """Read a card; the ONNX file beside it must exist (its checksum is checked on use)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CardError(f"model card {path}: {exc}") from None
        card = cls.from_dict(data, path)
        if not card.onnx_path.exists():
            raise CardError(f"model card {path}: its model {card.onnx_path.name} is missing")
        return card

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        data["labels"] = {str(k): asdict(v) for k, v in sorted(self.labels.items())}
        return {"schema": "musclenode-model-card/1", **data}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def verify(self) -> None:
        """Check the ONNX file against the card's checksum."""
        actual = file_sha256(self.onnx_path)
        if actual != self.sha256:
            raise CardError(f"model {self.name}: {self.onnx_path.name} does not match its card's sha256")


def _axis(direction: str) -> int:
    return {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}[direction]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
