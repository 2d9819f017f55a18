"""MONAI transforms that turn one labelled slice into a random training sample.

A training item is a dictionary holding one laid-out slice (see :mod:`.data`) of every contrast
(``[1, H, W]`` arrays keyed by contrast name), its labels (``"label"``), the layout's
``"array_axes"`` and precomputed foreground and background pixel indices for cropping.
:func:`training_transforms` draws the input contrast, changes intensity and contrast, normalises
the whole slice as the runtime will, crops a window around muscle or body, rotates, scales and
flips it. A left-right flip mirrors the anatomy, so it also swaps the label values of left and
right muscles; which array axis runs left-right is read from the item's ``array_axes``.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandGaussianSmoothd,
    RandGibbsNoised,
    RandRicianNoised,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    SelectItemsd,
)

from . import synthetic
from .data import CONTRASTS

__all__ = [
    "RandContrastd",
    "RandFieldOfViewd",
    "RandGhostd",
    "RandLeftRightFlipd",
    "RandResolutiond",
    "RandSliceThicknessd",
    "RandSyntheticContrastd",
    "lr_axis",
    "neighbour_key",
    "training_transforms",
]


def neighbour_key(contrast: str, side: str) -> str:
    """Key of the neighbouring slice of a contrast in a training item (``side`` prev or next)."""
    return f"{contrast}_{side}"


def lr_axis(array_axes: Sequence[str]) -> int:
    """Index (0 rows, 1 columns) of the axis that runs between the patient's left and right.

    Raises
    ------
    ValueError
        When neither axis runs left-right (e.g. a sagittal layout), so no flip can swap sides.
    """
    for axis, letter in enumerate(array_axes):
        if letter.upper() in ("L", "R"):
            return axis
    raise ValueError(f"no left-right axis in array_axes {list(array_axes)}")


class RandContrastd(RandomizableTransform, MapTransform):
    """Draw the input contrast of a sample among water, fat and in-phase (water + fat).

    Parameters
    ----------
    weights : mapping of str to float
        Relative probability of each contrast; a contrast missing from an item (and in-phase
        without both water and fat) is not drawn for it.
    output_key : str
        Key of the chosen image; the contrast keys are removed.
    """

    def __init__(self, weights: Mapping[str, float], output_key: str = "image") -> None:
        unknown = set(weights) - set(CONTRASTS)
        if unknown or not weights:
            raise ValueError(f"contrast weights must name some of {CONTRASTS}, not {sorted(weights)}")
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys=list(CONTRASTS), allow_missing_keys=True)
        self.weights = dict(weights)
        self.output_key = output_key
        self.contrast: str | None = None

    def _available(self, data: Mapping[Hashable, object]) -> list[str]:
        names = [c for c in self.weights if c in data]
        if "in_phase" in self.weights and "in_phase" not in data and "water" in data and "fat" in data:
            names.append("in_phase")
        return names

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        if self.output_key in data:  # an earlier transform (RandSyntheticContrastd) chose already
            self.contrast = None
            return {k: v for k, v in data.items() if k not in CONTRASTS}
        names = self._available(data)
        if not names:
            raise KeyError(f"item has none of the contrasts {sorted(self.weights)}")
        p = np.array([self.weights[n] for n in names], dtype=float)
        self.contrast = names[int(self.R.choice(len(names), p=p / p.sum()))]
        d = {k: v for k, v in data.items() if k not in CONTRASTS}
        if self.contrast in data:
            image = np.array(data[self.contrast], dtype=np.float32, copy=True)
        else:
            image = np.asarray(data["water"], dtype=np.float32) + np.asarray(data["fat"], dtype=np.float32)
        d[self.output_key] = image
        return d


class RandLeftRightFlipd(RandomizableTransform, MapTransform):
    """Mirror a sample left-right and swap the label values of left and right structures.

    Mirroring moves the patient's left muscles to where right ones lie, so a label that stayed
    "left multifidus" would teach the network the wrong side. The spatial axis flipped is the
    one the item's ``array_axes`` names L or R, i.e. the one the NIfTI affine says runs left-right.

    Parameters
    ----------
    keys : keys
        Channel-first arrays ``[C, H, W]`` to flip (images and labels).
    label_key : str
        Which of ``keys`` holds label values to swap.
    swap : mapping of int to int
        Label value to the value of the same structure on the other side (see
        :func:`.data.side_swap`); values not listed (background) stay.
    prob : float
        Probability of flipping.
    axes_key : str
        Key of the item's ``array_axes``.
    """

    def __init__(self, keys: KeysCollection, label_key: str, swap: Mapping[int, int],
                 prob: float = 0.5, axes_key: str = "array_axes") -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        if label_key not in self.keys:
            raise ValueError(f"label_key {label_key!r} must be one of the flipped keys")
        if any(swap.get(b) != a for a, b in swap.items()):
            raise ValueError(f"swap must pair values both ways: {dict(swap)}")
        self.label_key = label_key
        self.axes_key = axes_key
        size = max([0, *swap, *swap.values()]) + 1
        self.table = np.arange(size)
        for value, other in swap.items():
            self.table[value] = other

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        # +1: the arrays are channel-first.
        axis = lr_axis(d[self.axes_key]) + 1
        for key in self.key_iterator(d):
            d[key] = _flip(d[key], axis)
        d[self.label_key] = self._swap(d[self.label_key])
        return d

    def _swap(self, labels):
        if isinstance(labels, torch.Tensor):
            values = labels.long()
            table = torch.as_tensor(self.table, device=labels.device)
            inside = values < len(self.table)
            swapped = torch.where(inside, table[values.clamp(max=len(self.table) - 1)], values)
            return swapped.to(labels.dtype)
        values = np.asarray(labels).astype(np.int64)
        inside = values < len(self.table)
        swapped = np.where(inside, self.table[np.minimum(values, len(self.table) - 1)], values)
        return swapped.astype(np.asarray(labels).dtype)


def _flip(array, axis: int):
    if isinstance(array, torch.Tensor):
        return torch.flip(array, dims=(axis,))
    return np.ascontiguousarray(np.flip(array, axis=axis))


class RandSliceThicknessd(RandomizableTransform, MapTransform):
    """Thicker slices: blend each contrast with its neighbouring slices.

    A slab of thickness ``T`` centred on a slice of thickness ``d`` (the spacing) overlaps each
    neighbour by ``max(0, T/2 - d/2)`` mm, so each neighbour gets weight ``that / T`` and the slice
    itself the rest. The item carries its neighbours under :func:`neighbour_key` (the slice
    itself where a neighbour is missing or held out).

    Parameters
    ----------
    keys : keys
        Contrasts to blend (those missing from an item are skipped).
    thickness_mm : (float, float)
        Range of the simulated slice thickness.
    spacing_mm : float
        Slice spacing (and thickness) of the data.
    prob : float
        Probability of blending.
    """

    def __init__(self, keys: KeysCollection, thickness_mm: tuple[float, float] = (3.0, 8.0),
                 spacing_mm: float = 4.0, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.thickness_mm = thickness_mm
        self.spacing_mm = spacing_mm
        self.weight = 0.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        thickness = self.R.uniform(*self.thickness_mm)
        self.weight = max(0.0, thickness / 2 - self.spacing_mm / 2) / thickness

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        d = dict(data)
        if not self._do_transform or self.weight <= 0:
            return d
        for key in self.key_iterator(d):
            prev = d.get(neighbour_key(key, "prev"), d[key])
            nxt = d.get(neighbour_key(key, "next"), d[key])
            d[key] = ((1 - 2 * self.weight) * np.asarray(d[key], np.float32)
                      + self.weight * (np.asarray(prev, np.float32) + np.asarray(nxt, np.float32)))
        return d


class RandSyntheticContrastd(RandomizableTransform, MapTransform):
    """Replace the Dixon input by a synthetic T1-, T2- or PD-like image (:mod:`.synthetic`).

    With probability ``prob`` the sample's input becomes a synthetic image of a contrast drawn by
    ``weights``, its tissue intensities drawn per sample within
    :data:`.synthetic.TISSUE_RANGES`; the contrast keys are then removed and
    :class:`RandContrastd` passes the image through. Otherwise the item is left as it is and
    :class:`RandContrastd` draws a Dixon contrast.

    Parameters
    ----------
    weights : mapping of str to float
        Relative probability of ``"t1"``, ``"t2"``, ``"pd"``.
    prob : float
        Probability of a synthetic input.
    water_key, fat_key, output_key : str
    """

    def __init__(self, weights: Mapping[str, float], prob: float = 0.6, water_key: str = "water",
                 fat_key: str = "fat", output_key: str = "image") -> None:
        unknown = set(weights) - set(synthetic.SYNTHETIC_CONTRASTS)
        if unknown or not weights:
            raise ValueError(f"synthetic weights must name some of {synthetic.SYNTHETIC_CONTRASTS}, not {sorted(weights)}")
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, [water_key, fat_key])
        self.weights = dict(weights)
        self.water_key, self.fat_key, self.output_key = water_key, fat_key, output_key
        self.tissue: synthetic.TissueIntensities | None = None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        self.tissue = None
        if not self._do_transform or self.water_key not in data or self.fat_key not in data:
            return dict(data)
        names = list(self.weights)
        p = np.array([self.weights[n] for n in names], dtype=float)
        contrast = names[int(self.R.choice(len(names), p=p / p.sum()))]
        self.tissue = synthetic.draw_intensities(contrast, self.R)
        water, fat = np.asarray(data[self.water_key]), np.asarray(data[self.fat_key])
        image = synthetic.synthesize_slice(water[0], fat[0], self.tissue)[None]
        d = {k: v for k, v in data.items() if k not in CONTRASTS}
        d[self.output_key] = image
        return d


class RandFieldOfViewd(RandomizableTransform, MapTransform):
    """A smaller field of view: cut the slice to a random box that still holds every label.

    The image statistics used for normalisation change with what the field of view holds, so
    this runs before normalisation. Precomputed crop indices (``fg``/``bg`` keys) are recomputed.

    Parameters
    ----------
    keys : keys
        Image and label keys, ``[C, H, W]``.
    label_key : str
    margin : int
        Pixels kept around the labels at least.
    prob : float
    """

    def __init__(self, keys: KeysCollection, label_key: str = "label", margin: int = 12, prob: float = 0.3,
                 fg_key: str = "fg", bg_key: str = "bg") -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.label_key, self.margin, self.fg_key, self.bg_key = label_key, margin, fg_key, bg_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        label = np.asarray(d[self.label_key])[0]
        where = np.argwhere(label > 0)
        if not len(where):
            return d
        low = np.maximum(where.min(axis=0) - self.margin, 0)
        high = np.minimum(where.max(axis=0) + self.margin + 1, label.shape)
        first = [int(self.R.randint(0, lo + 1)) for lo in low]
        last = [int(self.R.randint(hi, n + 1)) for hi, n in zip(high, label.shape)]
        box = (slice(None), slice(first[0], last[0]), slice(first[1], last[1]))
        for key in self.key_iterator(d):
            d[key] = np.ascontiguousarray(np.asarray(d[key])[box])
        label = np.asarray(d[self.label_key])[0]
        image = np.asarray(d[[k for k in self.keys if k != self.label_key][0]])[0]
        d[self.fg_key] = np.flatnonzero(label > 0)
        d[self.bg_key] = np.flatnonzero((image != 0) & (label == 0))
        return d


class RandResolutiond(RandomizableTransform, MapTransform):
    """Coarser in-plane pixels (1-2 mm on the 1 mm grid), see :func:`.synthetic.degrade_resolution`."""

    def __init__(self, keys: KeysCollection, factors: tuple[float, float] = (1.0, 2.0), prob: float = 0.4) -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.factors = factors

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        factors = (self.R.uniform(*self.factors), self.R.uniform(*self.factors))
        for key in self.key_iterator(d):
            d[key] = np.stack([synthetic.degrade_resolution(np.asarray(c), factors) for c in np.asarray(d[key])])
        return d


class RandGhostd(RandomizableTransform, MapTransform):
    """A faint phase-encoding ghost along a random axis, see :func:`.synthetic.add_ghost`."""

    def __init__(self, keys: KeysCollection, amplitude: tuple[float, float] = (0.03, 0.15), prob: float = 0.15) -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.amplitude = amplitude

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        amplitude = self.R.uniform(*self.amplitude)
        axis = int(self.R.randint(0, 2))
        for key in self.key_iterator(d):
            image = np.asarray(d[key])
            size = image.shape[axis + 1]
            shift = int(size // 2 + self.R.randint(-size // 8, size // 8 + 1))
            d[key] = np.stack([synthetic.add_ghost(c, amplitude, axis, shift) for c in image])
        return d


def training_transforms(window: Sequence[int], swap: Mapping[int, int],
                        contrast_weights: Mapping[str, float], crop_margin: float = 1.4,
                        flip_prob: float = 0.5, synthetic_weights: Mapping[str, float] | None = None,
                        synthetic_prob: float = 0.6, degrade: bool = False) -> Compose:
    """The augmentation pipeline for one training item.

    Order matters: intensity and contrast changes act on raw intensities, then the whole slice
    is normalised over its non-zero pixels exactly as at inference (normalising a crop would
    give other statistics), and only then is a window cut, rotated, scaled and flipped, with
    zero (the normalised background) filling what comes from outside.

    Parameters
    ----------
    window : sequence of two int
        Output size, rows then columns (the card's window).
    swap : mapping of int to int
        Left-right partner of each label value.
    contrast_weights : mapping of str to float
        Relative probability of water, fat and in-phase input.
    crop_margin : float
        The crop before rotation is this much larger than the window, so that rotated and
        shrunk windows are filled with image rather than padding.
    flip_prob : float
        Probability of a left-right flip.
    synthetic_weights : mapping of str to float, optional
        Relative probability of synthetic T1, T2 and PD input (:class:`RandSyntheticContrastd`);
        none (the default) trains on Dixon contrasts only.
    synthetic_prob : float
        Probability that a sample is synthetic rather than a Dixon contrast.
    degrade : bool
        Also simulate other acquisitions: thicker slices (3-8 mm), coarser in-plane pixels
        (1-2 mm), a smaller field of view, a phase-encoding ghost, Gibbs ringing, Rician noise
        and a stronger bias field.
    """
    crop = [int(round(w * crop_margin)) for w in window]
    before: list = []
    if degrade:
        before.append(RandSliceThicknessd(list(CONTRASTS), thickness_mm=(3.0, 8.0), spacing_mm=4.0, prob=0.5))
    if synthetic_weights:
        before.append(RandSyntheticContrastd(synthetic_weights, prob=synthetic_prob))
    before.append(RandContrastd(contrast_weights))
    if degrade:
        before += [
            RandFieldOfViewd(["image", "label"], label_key="label", prob=0.3),
            RandResolutiond("image", factors=(1.0, 2.0), prob=0.4),
            RandGhostd("image", amplitude=(0.03, 0.15), prob=0.15),
            RandGibbsNoised("image", prob=0.1, alpha=(0.1, 0.5)),
        ]
    intensity = [
        RandAdjustContrastd("image", prob=0.5, gamma=(0.6, 1.6)),
        RandHistogramShiftd("image", num_control_points=(5, 10), prob=0.3),
        RandBiasFieldd("image", coeff_range=(0.0, 0.4 if degrade else 0.3), prob=0.4 if degrade else 0.3),
    ]
    if degrade:
        intensity.append(RandRicianNoised("image", prob=0.5, std=0.15, relative=True, sample_std=True))
    return Compose([
        *before,
        *intensity,
        NormalizeIntensityd("image", nonzero=True),
        # Two of three windows centred on a muscle pixel, one anywhere in the body (non-zero
        # image), so the network also learns what is not muscle (psoas, fat, bone).
        RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=crop, pos=2.0,
                               neg=1.0, num_samples=1, fg_indices_key="fg", bg_indices_key="bg",
                               allow_smaller=True),
        RandAffined(["image", "label"], spatial_size=list(window), prob=0.9,
                    rotate_range=(np.deg2rad(15.0),), scale_range=(0.15, 0.15),
                    translate_range=(8, 8), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandLeftRightFlipd(["image", "label"], label_key="label", swap=swap, prob=flip_prob),
        RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.2),
        # After normalisation: other subjects' slices normalise to slightly other scales.
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        SelectItemsd(["image", "label"]),
    ])
