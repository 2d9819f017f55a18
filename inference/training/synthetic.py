"""T1-, T2- and PD-like images synthesised from the water and fat images of a Dixon acquisition.

Only Dixon images are labelled here, yet a node also receives T1- and T2-weighted turbo spin
echo series. Water and fat images say, per pixel, how much of the signal comes from water and
from fat; with a guess of what each tissue looks like in another contrast, a plausible image of
that contrast can be drawn:

* tissue classes from W and F: fat (fat fraction F / (W + F)), muscle-like water (water near the
  slice's typical water level) and bright, fluid-like water (CSF, discs, kidney: water well above
  the typical level), and background (no signal);
* each class gets one intensity per image, drawn within :data:`TISSUE_RANGES` for the contrast
  (T1: fat bright, fluid dark; T2: fluid brightest, fat bright, muscle dark; PD: intermediate);
* pixels mix their classes by the fat fraction and by how fluid-like their water is (partial
  volume), and keep some of the original fine texture;
* a body mask with soft edges keeps the background dark; noise is added elsewhere.

These are *synthetic* contrasts: tissue relaxation times, chemical-shift artefacts, flow voids,
the dark cortical bone and ligaments of real TSE images are at best approximated. Numbers measured
on them say how well a model copes with contrast changes of this kind, not how it does on real
T1 or T2 TSE images from a scanner.

Nothing here imports torch: :mod:`.evaluate` and the benchmarks use this module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "SYNTHETIC_CONTRASTS",
    "TISSUE_RANGES",
    "TEST_SEEDS",
    "TissueIntensities",
    "add_ghost",
    "add_rician_noise",
    "degrade_resolution",
    "draw_intensities",
    "synthesize_slice",
    "synthesize_volume",
    "test_intensities",
    "test_volume",
]

#: Synthetic contrasts this module draws.
SYNTHETIC_CONTRASTS = ("t1", "t2", "pd")

#: Relative intensity ranges (0-1) per contrast and tissue class.
TISSUE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "t1": {"fat": (0.75, 1.0), "muscle": (0.22, 0.45), "fluid": (0.04, 0.2)},
    "t2": {"fat": (0.5, 0.85), "muscle": (0.1, 0.28), "fluid": (0.8, 1.0)},
    "pd": {"fat": (0.7, 1.0), "muscle": (0.35, 0.55), "fluid": (0.55, 0.85)},
}

#: Seeds of the fixed synthetic test images (:func:`test_volume`): the card's Dice table and the
#: benchmark use these, so their numbers are reproducible.
TEST_SEEDS = {"t1": 101, "t2": 202, "pd": 303}

#: Noise of the test images: SD of the Gaussian components as a fraction of the brightest tissue.
TEST_NOISE = 0.03


@dataclass(frozen=True)
class TissueIntensities:
    """One image's intensities and how tissue classes are separated.

    Attributes
    ----------
    contrast : str
        ``"t1"``, ``"t2"`` or ``"pd"``.
    fat, muscle, fluid : float
        Relative intensity of each class.
    fluid_start : float
        Water above this multiple of the slice's typical water level starts to count as fluid.
    fluid_width : float
        Over this further multiple it becomes fully fluid.
    texture : float
        Exponent of the original fine texture kept (0 none, 1 all).
    """

    contrast: str
    fat: float
    muscle: float
    fluid: float
    fluid_start: float = 1.3
    fluid_width: float = 0.3
    texture: float = 0.5

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def draw_intensities(contrast: str, rng: np.random.Generator,
                     ranges: Mapping[str, Mapping[str, tuple[float, float]]] = TISSUE_RANGES) -> TissueIntensities:
    """Draw one image's tissue intensities for ``contrast`` within ``ranges``."""
    if contrast not in ranges:
        raise ValueError(f"synthetic contrast must be one of {sorted(ranges)}, not {contrast!r}")
    r = ranges[contrast]
    return TissueIntensities(
        contrast, fat=float(rng.uniform(*r["fat"])), muscle=float(rng.uniform(*r["muscle"])),
        fluid=float(rng.uniform(*r["fluid"])), fluid_start=float(rng.uniform(1.2, 1.45)),
        fluid_width=float(rng.uniform(0.2, 0.45)), texture=float(rng.uniform(0.2, 0.9)))


def synthesize_slice(water: np.ndarray, fat: np.ndarray, tissue: TissueIntensities,
                     scale: float = 1000.0) -> np.ndarray:
    """A synthetic image of one slice from its water and fat images (same shape, float32).

    Parameters
    ----------
    water, fat : numpy.ndarray
        Water and fat images of the slice, ``[H, W]`` (non-negative; zero outside the body where
        the scanner masked it).
    tissue : TissueIntensities
        Intensities of the classes.
    scale : float
        Intensity of a tissue of relative intensity 1.
    """
    water = np.clip(np.asarray(water, np.float32), 0, None)
    fat = np.clip(np.asarray(fat, np.float32), 0, None)
    total = water + fat
    out = np.zeros(water.shape, np.float32)
    if not (total > 0).any():
        return out
    top = float(np.percentile(total[total > 0], 99))
    if top <= 0:
        return out
    # Soft body mask: full weight above 10 % of the bright tissue, fading to zero below 3 %.
    body = np.clip((total / top - 0.03) / 0.07, 0.0, 1.0)
    fat_fraction = np.where(total > 0, fat / np.maximum(total, 1e-6), 0.0)
    watery = (body >= 1) & (fat_fraction < 0.3)
    level = float(np.median(water[watery])) if watery.sum() > 50 else float(np.median(water[total > 0]))
    level = max(level, 1e-6)
    fluid = np.clip((water / level - tissue.fluid_start) / tissue.fluid_width, 0.0, 1.0)
    water_signal = (1 - fluid) * tissue.muscle + fluid * tissue.fluid
    signal = (1 - fat_fraction) * water_signal + fat_fraction * tissue.fat
    if tissue.texture > 0:
        smooth = ndimage.gaussian_filter(total, 2.0)
        ratio = np.where(smooth > 0.03 * top, total / np.maximum(smooth, 1e-6), 1.0)
        signal = signal * np.clip(ratio, 0.5, 2.0) ** tissue.texture
    return (signal * body * scale).astype(np.float32)


def synthesize_volume(water: np.ndarray, fat: np.ndarray, tissue: TissueIntensities, slice_axis: int,
                      scale: float = 1000.0) -> np.ndarray:
    """:func:`synthesize_slice` for every slice of a volume, along ``slice_axis``."""
    w = np.moveaxis(np.asarray(water, np.float32), slice_axis, 0)
    f = np.moveaxis(np.asarray(fat, np.float32), slice_axis, 0)
    out = np.stack([synthesize_slice(a, b, tissue, scale) for a, b in zip(w, f)])
    return np.moveaxis(out, 0, slice_axis)


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of SD ``sigma`` (Rician statistics).

    The background becomes non-zero noise, as in a real magnitude image that was not masked.
    """
    real = image + rng.normal(0.0, sigma, image.shape)
    imaginary = rng.normal(0.0, sigma, image.shape)
    return np.sqrt(real ** 2 + imaginary ** 2).astype(np.float32)


def add_ghost(image: np.ndarray, amplitude: float, axis: int, shift: int) -> np.ndarray:
    """A phase-encoding ghost: the image, shifted ``shift`` pixels along ``axis``, added faintly."""
    return (image + amplitude * np.roll(image, shift, axis=axis)).astype(np.float32)


def degrade_resolution(image: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Acquire at ``factors`` times coarser pixels and interpolate back onto the same grid.

    The image is low-pass filtered (Gaussian with the SD of a box of the new pixel size), sampled
    on the coarse grid and linearly interpolated back, as a scanner's coarser matrix then resampled
    to the model's 1 mm grid looks.
    """
    factors = [max(1.0, float(f)) for f in factors]
    if all(f == 1.0 for f in factors):
        return np.asarray(image, np.float32)
    sigma = [0.5 * np.sqrt(max(f ** 2 - 1, 0.0)) for f in factors]
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    coarse = [max(2, int(round(n / f))) for n, f in zip(image.shape, factors)]
    small = ndimage.zoom(smooth, [c / n for c, n in zip(coarse, image.shape)], order=1, grid_mode=True,
                         mode="nearest")
    back = ndimage.zoom(small, [n / c for n, c in zip(image.shape, small.shape)], order=1, grid_mode=True,
                        mode="nearest")
    out = np.zeros(image.shape, np.float32)
    rows, cols = min(out.shape[0], back.shape[0]), min(out.shape[1], back.shape[1])
    out[:rows, :cols] = back[:rows, :cols]
    return out


def test_intensities(contrast: str) -> TissueIntensities:
    """The tissue intensities of the fixed test volume of a contrast (:func:`test_volume`)."""
    return draw_intensities(contrast, np.random.default_rng(TEST_SEEDS[contrast]))


def test_volume(water: np.ndarray, fat: np.ndarray, contrast: str, slice_axis: int,
                seed: int | None = None) -> tuple[np.ndarray, TissueIntensities]:
    """The fixed synthetic test volume of one contrast: intensities drawn with :data:`TEST_SEEDS`,
    Rician noise of :data:`TEST_NOISE` of the brightest tissue, no other degradation."""
    rng = np.random.default_rng(TEST_SEEDS[contrast] if seed is None else seed)
    tissue = draw_intensities(contrast, rng)
    volume = synthesize_volume(water, fat, tissue, slice_axis)
    sigma = TEST_NOISE * 1000.0 * max(tissue.fat, tissue.muscle, tissue.fluid)
    return add_rician_noise(volume, sigma, rng), tissue
