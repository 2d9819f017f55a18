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
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    SelectItemsd,
)

from .data import CONTRASTS

__all__ = ["RandContrastd", "RandLeftRightFlipd", "lr_axis", "training_transforms"]


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


def training_transforms(window: Sequence[int], swap: Mapping[int, int],
                        contrast_weights: Mapping[str, float], crop_margin: float = 1.4,
                        flip_prob: float = 0.5) -> Compose:
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
    """
    crop = [int(round(w * crop_margin)) for w in window]
    return Compose([
        RandContrastd(contrast_weights),
        RandAdjustContrastd("image", prob=0.5, gamma=(0.6, 1.6)),
        RandHistogramShiftd("image", num_control_points=(5, 10), prob=0.3),
        RandBiasFieldd("image", coeff_range=(0.0, 0.3), prob=0.3),
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
