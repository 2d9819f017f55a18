"""Drawing the summary pages: key slices with muscle outlines, the measurement table, the charts.

The pages are what a radiologist sees of musclenode's results in any PACS viewer, so they are
drawn for reading at a glance on a dark viewing screen: large high-contrast text on a black page,
one hue per muscle (a deep shade for the right side, a light shade for the left), a red banner on
every page saying that the results are for research use only.

Decisions
---------
- **No identifying data in the pixels.** The pages show age, sex, BMI, the study date and the
  series, never the patient's name, ID or birth date: the DICOM header carries those and every
  viewer shows them from there, while text burned into pixels escapes de-identification tools.
- **Radiological convention from the geometry.** Each key slice is flipped or transposed (never
  resampled) so that, for an axial slice, image columns run towards the patient's left and rows
  towards posterior: the patient's left then appears on the viewer's right, as on a radiology
  screen. The R/L and A/P markers are computed from the direction cosines of the displayed axes,
  so a series acquired with mirrored columns shows the same picture with the same markers.
- **Outlines, not filled masks,** so that the muscle's own signal (fat infiltration) stays
  visible; each outline has a thin black halo so that it stands out on bright muscle and dark fat.
- **Fixed page size** (:data:`PAGE_SHAPE`, 960 x 1280, landscape: the table is wide) drawn with
  matplotlib's Agg canvas and DejaVu Sans (bundled with matplotlib), so that the same inputs give
  the same pixels on every machine with the same matplotlib.

Everything here is a pure function of its inputs; nothing is read or written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import numpy as np

from inference.geometry import LabelMap, SeriesImage
from inference.patient import PatientContext
from inference.segmentation_quality import SegmentationQuality
from inference.set_aside import describe_counts
from inference.vocabulary import FatQuantity, Laterality, Level, Muscle, Side

from .assessment import Assessment
from .levels import is_slice_level
from .metrics import ALL_LEVELS
from .reference import Comparison

__all__ = [
    "PAGE_SHAPE",
    "PREFERRED_DISCS",
    "RESEARCH_USE",
    "DisplaySlice",
    "LevelRow",
    "LevelValue",
    "Page",
    "choose_frames",
    "disc_key_frames",
    "display_slice",
    "key_frames",
    "level_bands",
    "level_layout",
    "level_order",
    "level_rows",
    "orientation_letters",
    "render_pages",
    "split_level_tables",
]

#: Rows and columns of every page.
PAGE_SHAPE = (960, 1280)
RESEARCH_USE = "For research use only \u2014 not for diagnostic use"
_DPI = 100

# Dark theme: viewers surround images with black, and reading rooms are dim.
_BACKGROUND = "#000000"
_TEXT = "#ffffff"
_MUTED = "#b4b4b4"
_BANNER = "#9b0000"
_ALERT = "#ff5a5a"
_ROW_SHADES = ("#161616", "#262626")
_BAND_2SD = "#3c3c3c"
_BAND_1SD = "#6a6a6a"
_MEAN_LINE = "#e0e0e0"



def _hex(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def _colour(muscle: Muscle, side: Laterality | Side) -> str:
    """The outline and chart colour (:meth:`Muscle.colour`, as the SEG's display colours, so that an
    outline here and a SEG overlay in a viewer look alike). Both sides together are drawn in the
    right side's deep shade, told apart by their marker shape."""
    return _hex(muscle.colour(Side.RIGHT if side == Laterality.BOTH else side))


# ---------------------------------------------------------------------------------------------
# Geometry of the displayed slice


_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))
#: A secondary letter is shown for an oblique axis when its component reaches this (about 24 deg).
_SECONDARY_COMPONENT = 0.4


def orientation_letters(direction: Sequence[float]) -> str:
    """Patient direction letters of an LPS vector, as viewers label an image edge.

    Parameters
    ----------
    direction : sequence of 3 float
        A direction in DICOM patient coordinates (LPS).

    Returns
    -------
    str
        The letter of the dominant axis (``L``/``R``, ``P``/``A``, ``H``/``F``), followed by the
        letters of other axes whose component is at least 0.4, largest first: ``"L"`` for
        (1, 0, 0), ``"PH"`` for a direction 30 degrees from posterior towards the head.
    """
    vector = np.asarray(direction, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if norm == 0 or not math.isfinite(norm):
        raise ValueError(f"direction {tuple(direction)} has no orientation")
    vector = vector / norm
    order = np.argsort(-np.abs(vector), kind="stable")
    letters = []
    for rank, axis in enumerate(order):
        component = vector[axis]
        if rank == 0 or abs(component) >= _SECONDARY_COMPONENT:
            letters.append(_AXIS_LETTERS[axis][int(component > 0)])
    return "".join(letters)


@dataclass(frozen=True, eq=False)
class DisplaySlice:
    """One frame turned for display in the radiological convention.

    Attributes
    ----------
    frame_index : int
        The frame of the series (source order).
    image : numpy.ndarray
        float32 ``(rows, columns)`` in display orientation.
    labels : numpy.ndarray
        uint8 label values on the same grid.
    spacing : tuple of 2 float
        mm between display rows, between display columns.
    column_direction, row_direction : tuple of 3 float
        LPS direction in which the display column index and the display row index grow.
    """

    frame_index: int
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float]
    column_direction: tuple[float, float, float]
    row_direction: tuple[float, float, float]

    @property
    def markers(self) -> dict[str, str]:
        """Orientation letters at the ``left``, ``right``, ``top`` and ``bottom`` image edges."""
        column = np.asarray(self.column_direction)
        row = np.asarray(self.row_direction)
        return {"left": orientation_letters(-column), "right": orientation_letters(column),
                "top": orientation_letters(-row), "bottom": orientation_letters(row)}

    @property
    def extent_mm(self) -> tuple[float, float]:
        """Width and height of the displayed image in mm."""
        return self.image.shape[1] * self.spacing[1], self.image.shape[0] * self.spacing[0]


def _display_axes(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target LPS directions of display columns and rows for a plane with this normal."""
    axis = int(np.argmax(np.abs(normal)))
    if axis == 2:  # axial: patient left to the viewer's right, anterior at the top
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    if axis == 1:  # coronal: patient left to the viewer's right, head at the top
        return np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    return np.array([0, 1.0, 0]), np.array([0, 0, -1.0])  # sagittal: anterior on the viewer's left


def display_slice(series: SeriesImage, labels: np.ndarray, frame_index: int) -> DisplaySlice:
    """A frame and its labels flipped or transposed into the radiological convention.

    Parameters
    ----------
    series : SeriesImage
        The series the labels lie on.
    labels : numpy.ndarray
        The frame's label values (``label_map.labels[frame_index]``).
    frame_index : int

    Returns
    -------
    DisplaySlice
        For an axial frame, display columns run towards the patient's left and rows towards
        posterior (the patient's left on the viewer's right); coronal frames have the head at the
        top and the patient's left on the right; sagittal frames the head at the top and anterior
        on the left. Oblique frames are turned to the nearest such orientation (no resampling).
    """
    geometry = series.geometry[frame_index]
    image = np.asarray(series.frames[frame_index], dtype=np.float32)
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} do not match frame {frame_index} {image.shape}")
    along_columns = np.asarray(geometry.row_cosine)  # the column index grows along the row cosine
    along_rows = np.asarray(geometry.column_cosine)
    spacing = (geometry.pixel_spacing[0], geometry.pixel_spacing[1])
    target_column, target_row = _display_axes(geometry.normal)
    if abs(along_columns @ target_column) < abs(along_rows @ target_column):
        image, labels = image.T, labels.T
        along_columns, along_rows = along_rows, along_columns
        spacing = (spacing[1], spacing[0])
    if along_columns @ target_column < 0:
        image, labels, along_columns = image[:, ::-1], labels[:, ::-1], -along_columns
    if along_rows @ target_row < 0:
        image, labels, along_rows = image[::-1, :], labels[::-1, :], -along_rows
    return DisplaySlice(frame_index, np.ascontiguousarray(image), np.ascontiguousarray(labels), spacing,
                        tuple(float(v) for v in along_columns), tuple(float(v) for v in along_rows))


def key_frames(label_map: LabelMap, count: int = 3) -> list[int]:
    """Frames to show: those nearest 25/50/75 % of the labelled head-foot range.

    Parameters
    ----------
    label_map : LabelMap
    count : int
        How many fractions of the range to sample (evenly, ends excluded: 3 gives 25/50/75 %).

    Returns
    -------
    list of int
        Distinct frame indices ordered from head to foot; fewer than ``count`` when fewer frames
        are labelled. With no labelled frame, the frame nearest the middle of the series.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    heights = np.array([g.centre[2] for g in label_map.series.geometry])
    known = np.array(list(label_map.meaning), dtype=np.uint8)
    labelled = [i for i, labels in enumerate(label_map.labels) if np.isin(labels, known).any()]
    candidates = labelled or list(range(len(heights)))
    low, high = heights[candidates].min(), heights[candidates].max()
    fractions = [(k + 1) / (count + 1) for k in range(count)] if labelled else [0.5]
    chosen: list[int] = []
    for fraction in fractions:
        target = high - fraction * (high - low)
        # Ties go to the earlier frame, so that the choice does not depend on float noise.
        best = min(candidates, key=lambda i: (round(abs(heights[i] - target), 6), i))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen, key=lambda i: (-heights[i], i))


# ---------------------------------------------------------------------------------------------
# Pages


@dataclass(frozen=True, eq=False)
class Page:
    """One rendered page.

    Attributes
    ----------
    title : str
        What the page shows (ASCII, for ImageComments and PDF metadata).
    pixels : numpy.ndarray
        uint8 RGB ``(rows, columns, 3)``, :data:`PAGE_SHAPE`.
    frames : tuple of int
        The frames of the series the page shows (the key slices of page 1), head to foot; empty
        for a page that shows numbers of the whole segmentation.
    """

    title: str
    pixels: np.ndarray
    frames: tuple[int, ...] = ()


def _figure():
    # Figure and the Agg canvas directly: no pyplot, so no global figure registry and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PAGE_SHAPE[1] / _DPI, PAGE_SHAPE[0] / _DPI), dpi=_DPI, facecolor=_BACKGROUND)
    FigureCanvasAgg(figure)
    return figure


def _pixels(figure) -> np.ndarray:
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    if rgba.shape[:2] != PAGE_SHAPE:
        raise RuntimeError(f"page rendered at {rgba.shape[:2]}, not {PAGE_SHAPE}")
    return np.ascontiguousarray(rgba[..., :3])


def _rect(left: float, top: float, width: float, height: float) -> list[float]:
    """Figure-fraction rectangle from pixel coordinates measured from the top-left corner."""
    rows, columns = PAGE_SHAPE
    return [left / columns, 1 - (top + height) / rows, width / columns, height / rows]


def _text_px(figure, x: float, y: float, text: str, **kwargs):
    """Text placed in page pixels from the top-left corner."""
    rows, columns = PAGE_SHAPE
    kwargs.setdefault("color", _TEXT)
    kwargs.setdefault("va", "top")
    return figure.text(x / columns, 1 - y / rows, text, **kwargs)


@functools.lru_cache(maxsize=8192)
def _text_width(text: str, fontsize: float) -> float:
    """Rendered width in page pixels of one word (DejaVu Sans, the page's resolution)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = _measuring_renderer(RendererAgg)
    return renderer.get_text_width_height_descent(text, FontProperties(family="DejaVu Sans", size=fontsize),
                                                  ismath=False)[0]


@functools.lru_cache(maxsize=1)
def _measuring_renderer(kind):
    return kind(8, 8, _DPI)


def _wrap(text: str, fontsize: float, width_px: float, indent: str = "    ") -> str:
    """Greedy word wrap by the rendered width of the words, so that no line leaves the page.

    Words are measured one by one (cached) and added up with the width of a space: kerning
    across a space is nil in DejaVu Sans, and measuring each growing line made this quadratic.
    """
    space = _text_width("a a", fontsize) - 2 * _text_width("a", fontsize)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line, used = "", 0.0
        for word in paragraph.split(" "):
            size = _text_width(word, fontsize) if word else 0.0
            if line and used + space + size > width_px:
                lines.append(line)
                line, used = indent + word, _text_width(indent, fontsize) + size if indent else size
            else:
                used = used + space + size if line else size
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class _Context:
    """What every page's header says."""

    patient_line: str
    study_line: str
    model_line: str
    page_count: int = 0


def _patient_line(patient: PatientContext) -> str:
    age = f"{patient.age_completed_years} y" if patient.age_years is not None else "age unknown"
    sex = patient.sex.display if patient.sex is not None else "sex unknown"
    bmi = f"BMI {patient.bmi:.1f} kg/m\u00b2" if patient.bmi is not None else "BMI unknown"
    return f"Patient: {age}, {sex}, {bmi}"


def _study_line(series: SeriesImage) -> str:
    date = series.study.study_date
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    number = f"{series.series_number} " if series.series_number is not None else ""
    text = series.series_description
    # A long description must not push the line off the page.
    text = text if len(text) <= 40 else text[:39] + "\u2026"
    description = f"\u201c{text}\u201d " if text else ""
    return f"Study {date or 'date unknown'} \u00b7 Series {number}{description}({len(series)} images)"


def _header(figure, context: _Context, number: int, title: str) -> None:
    """Research-use banner, patient and study line, page title."""
    rows, columns = PAGE_SHAPE
    banner = figure.add_axes(_rect(0, 0, columns, 50))
    banner.set_axis_off()
    banner.add_patch(_rectangle((0, 0), 1, 1, facecolor=_BANNER, transform=banner.transAxes))
    _text_px(figure, 16, 25, "musclenode \u00b7 paraspinal muscles", fontsize=17, fontweight="bold", va="center")
    _text_px(figure, columns - 16, 25, RESEARCH_USE.upper(), fontsize=17, fontweight="bold", va="center", ha="right")
    _text_px(figure, 16, 60, f"{context.patient_line}   \u00b7   {context.study_line}", fontsize=14)
    _text_px(figure, 16, 84, context.model_line, fontsize=12, color=_MUTED)
    _text_px(figure, 16, 108, title, fontsize=20, fontweight="bold")
    _text_px(figure, columns - 16, 112, f"Page {number} of {context.page_count}", fontsize=16, ha="right")


def _rectangle(xy, width, height, **kwargs):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, **kwargs)


def _halo(width: float):
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground="black")]


# ---------------------------------------------------------------------------------------------
# Page 1: key slices


_SLICE_MARGIN_MM = 20.0


def _crop(slices: Sequence[DisplaySlice], values: Sequence[int]) -> list[tuple[float, float, float, float]]:
    """Square viewing windows (x0, x1, y0, y1 in mm) around the labelled muscles of each slice.

    Slices on the same grid share one window (the union of their muscles), so that sizes compare
    between panels; a slice without labels shows its whole field of view.
    """
    boxes = []
    for item in slices:
        rows, columns = np.nonzero(np.isin(item.labels, values))
        if rows.size == 0:
            boxes.append(None)
            continue
        dy, dx = item.spacing
        boxes.append((columns.min() * dx, (columns.max() + 1) * dx, rows.min() * dy, (rows.max() + 1) * dy))
    shared = [b for b, s in zip(boxes, slices) if b is not None and s.image.shape == slices[0].image.shape
              and np.allclose(s.spacing, slices[0].spacing)]
    same_grid = len(shared) == sum(b is not None for b in boxes)
    union = (min(b[0] for b in shared), max(b[1] for b in shared), min(b[2] for b in shared),
             max(b[3] for b in shared)) if shared and same_grid else None
    windows = []
    for box, item in zip(boxes, slices):
        width, height = item.extent_mm
        if box is None:
            side = max(width, height)
            windows.append(((width - side) / 2, (width + side) / 2, (height - side) / 2, (height + side) / 2))
            continue
        x0, x1, y0, y1 = union or box
        side = max(x1 - x0, y1 - y0) + 2 * _SLICE_MARGIN_MM
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        # Keep the window inside the image where it fits, so that no panel shows empty border.
        cx = min(max(cx, side / 2), width - side / 2) if side <= width else width / 2
        cy = min(max(cy, side / 2), height - side / 2) if side <= height else height / 2
        windows.append((cx - side / 2, cx + side / 2, cy - side / 2, cy + side / 2))
    return windows


def _window_levels(image: np.ndarray) -> tuple[float, float]:
    """Display range from the 1st and 99.5th percentiles of the non-zero pixels."""
    values = image[np.isfinite(image) & (image != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1.0, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _draw_slice(figure, rect, item: DisplaySlice, window, meaning, title: str, alert: bool = False) -> None:
    ax = figure.add_axes(rect)
    ax.set_facecolor(_BACKGROUND)
    width, height = item.extent_mm
    low, high = _window_levels(item.image)
    ax.imshow(item.image, cmap="gray", vmin=low, vmax=high, extent=(0, width, height, 0),
              interpolation="bilinear", origin="upper")
    dy, dx = item.spacing
    x = (np.arange(item.image.shape[1]) + 0.5) * dx
    y = (np.arange(item.image.shape[0]) + 0.5) * dy
    for value, info in meaning.items():
        mask = item.labels == value
        if not mask.any():
            continue
        rows, columns = _around(mask)
        contours = ax.contour(x[columns], y[rows], mask[rows, columns].astype(np.float32), levels=[0.5],
                              colors=[_colour(info.muscle, info.side)], linewidths=2.4)
        contours.set_path_effects(_halo(4.2))
    x0, x1, y0, y1 = window
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#505050")
    markers = item.markers
    style = dict(transform=ax.transAxes, color="#ffff66", fontsize=20, fontweight="bold", path_effects=_halo(3))
    ax.text(0.02, 0.5, markers["left"], ha="left", va="center", **style)
    ax.text(0.98, 0.5, markers["right"], ha="right", va="center", **style)
    ax.text(0.5, 0.98, markers["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.02, markers["bottom"], ha="center", va="bottom", **style)
    # A scale bar: panels are zoomed to the muscles, so the scale is not the viewer's.
    bar = max([b for b in (10.0, 20.0, 50.0, 100.0) if b <= 0.4 * (x1 - x0)], default=10.0)
    left = x0 + 0.05 * (x1 - x0)
    base = y1 - 0.05 * (y1 - y0)
    ax.plot([left, left + bar], [base, base], color="white", linewidth=4, solid_capstyle="butt",
            path_effects=_halo(6))
    ax.text(left + bar / 2, base - 0.015 * (y1 - y0), f"{bar / 10:g} cm", ha="center", va="bottom",
            color="white", fontsize=13, path_effects=_halo(3))
    ax.set_title(title, color=_ALERT if alert else _TEXT, fontsize=14, pad=5,
                 fontweight="bold" if alert else "normal")
    if alert:  # an excluded image: framed in the alert colour as well as titled
        for spine in ax.spines.values():
            spine.set_color(_ALERT)
            spine.set_linewidth(3)


def _around(mask: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the mask's bounding box and one pixel more on each side (within the
    image): the outline of the mask on this part alone is the same outline, vertex for vertex
    (nothing crosses the zero border), at a fraction of the cost of contouring the whole image."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    return (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(columns[0] - 1, 0), columns[-1] + 2))


def _slice_title(series: SeriesImage, index: int, levels: dict[int, str], disc: str | None = None) -> str:
    """A key slice's title: its disc level first when it is that disc's key slice."""
    height = series.geometry[index].centre[2]
    if disc is not None:
        return f"{disc} \u00b7 image {index + 1} of {len(series)} \u00b7 z {height:+.0f} mm"
    level = f" \u00b7 {levels[index]}" if index in levels else ""
    return f"Image {index + 1} of {len(series)} \u00b7 z {height:+.0f} mm{level}"


def _frame_levels(assessments: Sequence[Assessment]) -> dict[int, str]:
    levels: dict[int, str] = {}
    for item in assessments:
        for area in item.metrics.slices:
            if area.level:
                levels.setdefault(area.frame_index, area.level)
    return levels


#: Disc levels whose key slices page 1 shows first (the levels most often read and published).
PREFERRED_DISCS = ("L3-L4", "L4-L5", "L5-S1")


def level_order(level: str) -> tuple[int, float, str]:
    """Sort key of a level name, head to foot.

    Returns
    -------
    tuple
        ``(0, order, "")`` for a level of the vocabulary (:attr:`Level.order`: T12, T12-L1, L1,
        L1-L2, ..., L5, L5-S1, S1), ``(1, 0.0, name)`` for any other name, so that names the
        vocabulary does not know come last, alphabetically.
    """
    try:
        return (0, Level.parse(level).order, "")
    except ValueError:
        return (1, 0.0, level)


def _is_disc(level: str) -> bool:
    try:
        return Level.parse(level).disc
    except ValueError:
        return False


def disc_key_frames(assessments: Sequence[Assessment]) -> dict[str, int]:
    """The key slice of each disc level that has one.

    Returns
    -------
    dict of str to int
        Disc level name to the frame index of its key slice (``metrics.key_slice``, the frame
        nearest the middle of the disc); a level whose muscles have no key slice (absent there,
        or the frame excluded by quality control) is left out.
    """
    frames: dict[str, int] = {}
    for item in assessments:
        metrics = item.metrics
        if metrics.level != ALL_LEVELS and metrics.key_slice is not None and _is_disc(metrics.level):
            frames.setdefault(metrics.level, metrics.key_slice.frame_index)
    return frames


def choose_frames(spread: Sequence[int], discs: Mapping[str, int], excluded: Collection[int],
                  heights: Sequence[float], count: int = 4) -> list[tuple[int, str | None]]:
    """The frames page 1 shows, and the disc level each is the key slice of.

    Parameters
    ----------
    spread : sequence of int
        Frames spread over the labelled range (:func:`key_frames`), head to foot: shown when no
        disc level has a key slice.
    discs : mapping of str to int
        Disc level name to its key frame (:func:`disc_key_frames`).
    excluded : collection of int
        Frames that quality control excluded.
    heights : sequence of float
        Head-foot position (LPS z, mm) of every frame of the series.
    count : int
        Most frames to show.

    Returns
    -------
    list of (int, str or None)
        At most ``count`` distinct frames, head to foot (ties by index), each with its disc level
        or None. With disc key slices: those of L3-L4, L4-L5 and L5-S1 first, then the other
        discs head to foot; otherwise ``spread``. When frames were excluded and none of those
        chosen is, the chosen frame of least priority (the last disc taken, or the foot-most of
        ``spread``) gives way to the middle excluded frame, so that the page shows what quality
        control set aside.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if discs:
        names = sorted(discs, key=lambda name: (name not in PREFERRED_DISCS, level_order(name)))
        chosen: list[tuple[int, str | None]] = []
        for name in names:
            if discs[name] not in [frame for frame, _ in chosen]:
                chosen.append((discs[name], name))
    else:
        chosen = [(frame, None) for frame in dict.fromkeys(spread)]
    chosen = chosen[:count]
    ordered = sorted(excluded)
    if ordered and not {frame for frame, _ in chosen} & set(ordered):
        chosen = chosen[:count - 1] + [(ordered[len(ordered) // 2], None)]
    return sorted(chosen, key=lambda pair: (-heights[pair[0]], pair[0]))


def _shown_frames(label_map: LabelMap, assessments: Sequence[Assessment],
                  quality: SegmentationQuality | None) -> list[tuple[int, str | None]]:
    """Page 1's frames (:func:`choose_frames`) for this label map, its measurements and quality."""
    excluded = quality.excluded_frames if quality is not None else frozenset()
    heights = [g.centre[2] for g in label_map.series.geometry]
    return choose_frames(key_frames(label_map, 4), disc_key_frames(assessments), excluded, heights)


def _key_slice_page(figure, label_map: LabelMap, assessments: Sequence[Assessment],
                    quality: SegmentationQuality | None, shown: Sequence[tuple[int, str | None]]) -> None:
    series = label_map.series
    discs = dict(shown)
    excluded = quality.excluded_frames if quality is not None else frozenset()
    slices = [display_slice(series, label_map.labels[i], i) for i, _ in shown]
    windows = _crop(slices, list(label_map.meaning))
    levels = _frame_levels(assessments)
    # A 2 x 2 grid, head to foot in reading order; legend and key numbers in the right column.
    size, title, top, gap = 372, 30, 134, 20
    cells = [(16 + column * (size + gap), top + row * (size + title + 10)) for row in (0, 1) for column in (0, 1)]
    for (left, cell_top), item, window in zip(cells, slices, windows):
        heading = (f"Image {item.frame_index + 1} of {len(series)} \u00b7 EXCLUDED" if item.frame_index in excluded
                   else _slice_title(series, item.frame_index, levels, discs[item.frame_index]))
        _draw_slice(figure, _rect(left, cell_top + title, size, size), item, window, label_map.meaning, heading,
                    alert=item.frame_index in excluded)
    column = 16 + 2 * (size + gap) + 14
    bottom = _legend_block(figure, label_map, column, top + 14)
    if quality is not None and not quality.measured:
        _not_measured_block(figure, quality, column, bottom + 26)
    else:
        _glance_block(figure, label_map, assessments, column, bottom + 26, quality,
                      [disc for _, disc in shown if disc is not None])


def _not_measured_block(figure, quality: SegmentationQuality, left: float, top: float) -> None:
    """In place of the numbers: that the series was tried, and why it gives none."""
    _text_px(figure, left, top, "Not measured", fontsize=19, fontweight="bold", color=_ALERT)
    width = PAGE_SHAPE[1] - left - 16
    y = top + 36
    for text in (f"The segmentation failed quality control: {quality.reason}.",
                 "No muscle size or fat is reported for this series. Outlines are shown as the model drew them; "
                 "images marked EXCLUDED failed the checks, and the structured report names each image with "
                 "its problems."):
        wrapped = _wrap(text, 14, width, indent="")
        _text_px(figure, left, y, wrapped, fontsize=14, color=_TEXT, linespacing=1.3)
        y += 25.5 * (wrapped.count("\n") + 1) + 12


def _legend_block(figure, label_map: LabelMap, left: float, top: float) -> float:
    """The outline colours present, a row per muscle with its R and L swatches.

    Returns
    -------
    float
        The pixel row below the block.
    """
    from matplotlib.lines import Line2D

    _text_px(figure, left, top, "Outlines", fontsize=17, fontweight="bold")
    y = top + 38
    present: dict[Muscle, set[Side]] = {}
    for value, info in label_map.meaning.items():
        # Stops at the first frame with the value: far cheaper than LabelMap.values_present(),
        # which takes np.unique of every frame.
        if any((labels == value).any() for labels in label_map.labels):
            present.setdefault(info.muscle, set()).add(info.side)
    if not present:
        _text_px(figure, left, y, "No muscle was found in this series.", fontsize=15, color=_ALERT)
        return y + 30
    _text_px(figure, left + 276, y - 30, "R", fontsize=14, color=_MUTED, ha="center")
    _text_px(figure, left + 356, y - 30, "L", fontsize=14, color=_MUTED, ha="center")
    for muscle in sorted(present, key=lambda m: m.index):
        _text_px(figure, left, y, muscle.display, fontsize=16)
        for side, centre in ((Side.RIGHT, left + 276), (Side.LEFT, left + 356)):
            if side not in present[muscle]:
                continue
            line = Line2D([(centre - 26) / PAGE_SHAPE[1], (centre + 26) / PAGE_SHAPE[1]],
                          [1 - (y + 11) / PAGE_SHAPE[0]] * 2, transform=figure.transFigure,
                          color=_colour(muscle, side), linewidth=5, path_effects=_halo(7))
            figure.add_artist(line)
        y += 31
    _text_px(figure, left, y + 6, "Patient's left is on the viewer's right\n(R and L markers on every image).",
             fontsize=13, color=_MUTED, linespacing=1.4)
    return y + 50


def _glance_block(figure, label_map: LabelMap, assessments: Sequence[Assessment], left: float,
                  top: float, quality: SegmentationQuality | None = None, discs: Sequence[str] = ()) -> None:
    lines = []
    overall = [a for a in assessments if a.metrics.level == ALL_LEVELS and a.metrics.side is not Laterality.BOTH]
    for item in sorted(overall, key=lambda a: (a.metrics.muscle.index, a.metrics.side is not Laterality.RIGHT)):
        fat = item.metrics.fat
        if fat is None or fat.mean_percent is None:
            continue
        z = f"  z {_signed(item.fat.z, 1)}" if item.fat is not None and item.fat.z is not None else ""
        lines.append((f"{item.metrics.muscle.short} {item.metrics.side.letter}",
                      f"{fat.mean_percent:.1f} %{z}", item))
    _text_px(figure, left, top, "Fat at a glance", fontsize=17, fontweight="bold")
    y = top + 34
    if not lines:
        _text_px(figure, left, y, "No fat measurement\n(no fat source for this series).", fontsize=14,
                 color=_MUTED)
        y += 50
    for name, value, item in lines:
        alert = ((item.fat is not None and item.fat.z is not None and item.fat.z >= 2)
                 or (item.severe is not None and item.severe.value is True)
                 or (item.grade is not None and item.grade.value == 2))
        _text_px(figure, left, y, name, fontsize=15)
        _text_px(figure, left + 360, y, value, fontsize=15, ha="right", color=_ALERT if alert else _TEXT,
                 fontweight="bold" if alert else "normal")
        y += 27
    y += 10
    for note in _page1_notes(label_map, assessments, quality, discs):
        wrapped = _wrap(note, 13, PAGE_SHAPE[1] - left - 16, indent="")
        _text_px(figure, left, y, wrapped, fontsize=13, color=_MUTED, linespacing=1.3)
        y += 23.5 * (wrapped.count("\n") + 1) + 8


def _page1_notes(label_map: LabelMap, assessments: Sequence[Assessment],
                 quality: SegmentationQuality | None = None, discs: Sequence[str] = ()) -> list[str]:
    notes = ["Full measurements, reference bands and grades: next pages."]
    if discs:
        names = ", ".join(sorted(discs, key=level_order))
        notes.insert(0, f"Images: the key slice of each disc level shown ({names}), the image nearest the "
                        "middle of the disc.")
    if quality is not None and quality.excluded:
        notes.append(f"Quality control: {quality.verdict}. {quality.reason}. Excluded images enter no number "
                     "(marked EXCLUDED where shown).")
    elif quality is not None:
        notes.append(f"Quality control: {quality.verdict}: the outlines of all {len(quality.checks)} images passed "
                     "the checks.")
    kind = next((a.metrics.fat for a in assessments if a.metrics.fat is not None), None)
    if kind is not None:
        notes.insert(0, f"Fat: {kind.method.description}.")
    swapped = [f for f in label_map.findings if f.action == "swapped"]
    kept = [f for f in label_map.findings if f.action != "swapped"]
    if swapped:
        notes.append(f"Left/right check: labels of {len(swapped)} muscle slice(s) were on the wrong side and "
                     "were exchanged.")
    if kept:
        notes.append(f"Left/right check: {len(kept)} muscle slice(s) have a label on the wrong side, left as "
                     "segmented: please review.")
    if label_map.set_aside:
        where = sorted({item.where for item in label_map.set_aside})
        shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
        notes.append(f"{describe_counts(label_map.set_aside)} ({shown}): not segmented or measured; "
                     "the structured report names each with its reason.")
    return notes


# ---------------------------------------------------------------------------------------------
# Page 2: measurements


def _signed(value: float | None, digits: int) -> str:
    if value is None:
        return "\u2014"
    text = f"{abs(value):.{digits}f}"
    if float(text) == 0:
        return text
    return ("\u2212" if value < 0 else "+") + text


def _percentile(value: float | None) -> str:
    if value is None:
        return "\u2014"
    if value < 1:
        return "<1"
    if value > 99:
        return ">99"
    return f"{value:.0f}"


_SUPERSCRIPT_DIGITS = str.maketrans("0123456789", "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")
#: Superscript letters that DejaVu Sans draws (a b c d e f g h i j k m n o p r s t u v w x y z).
_SUPERSCRIPT_LETTERS = ("\u1d43", "\u1d47", "\u1d9c", "\u1d48", "\u1d49", "\u1da0", "\u1d4d", "\u02b0", "\u2071",
                        "\u02b2", "\u1d4f", "\u1d50", "\u207f", "\u1d52", "\u1d56", "\u02b3", "\u02e2", "\u1d57",
                        "\u1d58", "\u1d5b", "\u02b7", "\u02e3", "\u02b8", "\u1dbb")


class _Notes:
    """Footnotes collected while the table is laid out: numbered reasons, lettered references."""

    def __init__(self) -> None:
        self.references: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    def reference(self, text: str) -> str:
        """The superscript letter of a reference group (the same group keeps its letter)."""
        if text not in self.references:
            count = len(self.references)
            letters = _SUPERSCRIPT_LETTERS
            mark = letters[count % len(letters)] * (count // len(letters) + 1)
            self.references[text] = mark
        return self.references[text]

    def reason(self, text: str) -> str:
        """The superscript number of a reason (the same reason keeps its number)."""
        if text not in self.reasons:
            self.reasons[text] = str(len(self.reasons) + 1).translate(_SUPERSCRIPT_DIGITS)
        return self.reasons[text]

    def lines(self) -> list[str]:
        out = [f"{mark}  {text}" for text, mark in self.references.items()]
        out += [f"{mark}  {text}" for text, mark in self.reasons.items()]
        return out


def _stratum_text(comparison: Comparison) -> str:
    stratum = comparison.stratum
    if stratum.kind == "site":  # the description gives n and the ages; the citation names the model
        return f"reference: {stratum.citation}: {stratum.description}"
    n = f", n {stratum.n}" if stratum.n else ""
    return f"reference: {stratum.description}{n}; {stratum.citation}"


def _reference_cell(comparison: Comparison) -> str:
    """A published group's mean ± SD, or a site reference's 5th-95th centiles for the person (a range)."""
    stratum = comparison.stratum
    if stratum.mean is not None and stratum.sd is not None:
        return f"{stratum.mean:.1f} \u00b1 {stratum.sd:.1f}"
    return f"{stratum.bands[1]:.1f}\u2013{stratum.bands[5]:.1f}"


@dataclass(frozen=True)
class _Cell:
    text: str
    alert: bool = False
    muted: bool = False


#: Table columns: (key, header, width in px, alignment). "csa_z" appears only when some CSA was compared.
_COLUMNS = (
    ("muscle", "Muscle", 214, "left"),
    ("side", "Side", 58, "left"),
    ("csa", "CSA\nmm\u00b2", 92, "right"),
    ("csa_z", "CSA\nz", 86, "right"),
    ("volume", "Volume\ncm\u00b3", 96, "right"),
    ("fat", "Fat\n%", 80, "right"),
    ("lean", "Lean CSA\nmm\u00b2", 118, "right"),
    ("asymmetry", "Asym.\n%", 116, "right"),
    ("z", "Fat\nz", 76, "right"),
    ("percentile", "Fat\npctl", 70, "right"),
    ("reference", "Fat ref. %\n\u00b1SD | P5\u201395", 176, "right"),
    ("grade", "Grade", 150, "left"),
)


def _columns(assessments: Sequence[Assessment]) -> list[tuple[str, str, float, str]]:
    """The columns to show, widened to the page width."""
    compared = any(a.csa is not None and a.csa.z is not None for a in assessments)
    chosen = [c for c in _COLUMNS if c[0] != "csa_z" or compared]
    spare = (PAGE_SHAPE[1] - 32 - sum(c[2] for c in chosen)) / len(chosen)
    return [(key, header, width + spare, align) for key, header, width, align in chosen]


def _row_cells(item: Assessment, notes: _Notes) -> dict[str, _Cell]:
    metrics = item.metrics
    cells = {"muscle": _Cell(metrics.muscle.short), "side": _Cell(metrics.side.letter)}
    csa = f"{metrics.mean_csa_mm2:.0f}"
    csa_z, csa_alert = "\u2014", False
    if item.csa is not None:
        if item.csa.z is not None:
            csa_z = _signed(item.csa.z, 1) + notes.reference(_stratum_text(item.csa))
            csa_alert = item.csa.z <= -2
        elif item.csa.reason:
            csa += notes.reason(f"Not compared: {item.csa.reason}")
    cells["csa"] = _Cell(csa)
    cells["csa_z"] = _Cell(csa_z, csa_alert)
    cells["volume"] = _Cell(f"{metrics.volume_cm3:.1f}" if metrics.volume_cm3 is not None else "\u2014")
    fat_text, fat_muted = "\u2014", False
    if metrics.fat is not None:
        if metrics.fat.mean_percent is not None:
            fat_text = f"{metrics.fat.mean_percent:.1f}"
        if not metrics.fat.reliable or metrics.fat.note:
            fat_text += notes.reason(metrics.fat.note or "unreliable")
            fat_muted = not metrics.fat.reliable
    lean = f"{metrics.functional_csa_mm2:.0f}" if metrics.functional_csa_mm2 is not None else "\u2014"
    cells["lean"] = _Cell(lean)
    asymmetry = "\u2014"
    if metrics.asymmetry_percent is not None:
        # Signed as in reports.metrics: positive when the right side is larger.
        bigger = "R>L" if metrics.asymmetry_percent > 0 else "L>R"
        asymmetry = f"{abs(metrics.asymmetry_percent):.1f} {bigger}"
    cells["asymmetry"] = _Cell(asymmetry)
    z = percentile = reference = "\u2014"
    alert = False
    if item.fat is not None:
        if item.fat.z is not None:
            z, percentile = _signed(item.fat.z, 1), _percentile(item.fat.percentile)
            reference = _reference_cell(item.fat) + notes.reference(_stratum_text(item.fat))
            alert = item.fat.z >= 2
        elif item.fat.reason:
            reference = "none" + notes.reason(f"Not compared: {item.fat.reason}")
    cells["fat"] = _Cell(fat_text, alert, fat_muted)
    cells["z"] = _Cell(z, alert)
    cells["percentile"] = _Cell(percentile, alert)
    cells["reference"] = _Cell(reference)
    grade, grade_alert = "\u2014", False
    if item.grade is not None:
        if item.grade.graded:
            grade = f"Grade {item.grade.value}"
            grade_alert = item.grade.value == 2
        elif metrics.muscle is not Muscle.MULTIFIDUS:
            grade = "\u2014"  # the grades are defined for the multifidus only, as the notes say
        else:
            grade = "not graded" + notes.reason(f"Not graded: {item.grade.note}")
    if item.severe is not None and item.severe.value is True:
        grade += ", SEVERE"
        grade_alert = True
    cells["grade"] = _Cell(grade, grade_alert)
    return cells


def _whole_series(assessments: Sequence[Assessment]) -> list[Assessment]:
    """The whole series' rows (level group ``"all"``): muscles in their order, then left, right, both.
    The levels have a compact table of their own (:func:`level_rows`)."""
    rows = [a for a in assessments if a.metrics.level == ALL_LEVELS]
    return sorted(rows, key=lambda a: (a.metrics.muscle.index, tuple(Laterality).index(a.metrics.side)))


_TABLE_TOP, _HEADER_HEIGHT, _ROW_HEIGHT = 146, 54, 37
_NOTE_SIZE, _NOTE_LINE = 13, 20


def _table_pages(assessments: Sequence[Assessment]) -> list[list[tuple[str, object]]]:
    """Entries of the whole series' measurement pages: ("group", title) and ("row", assessment).

    Rows go onto a page while the page's footnotes still fit below them, so that no note is ever
    cut off; a table that continues on the next page repeats its title. Only the whole series
    (:func:`_whole_series`) is listed: the levels are on the compact page (:func:`level_rows`).
    """
    items = _whole_series(assessments)
    title = "Whole series"
    if items and items[0].levels:
        title += f" (compared with the {items[0].levels} reference)"
    # A muscle's sides stay on one page, so that L, R and L+R are read together.
    blocks: list[list[Assessment]] = []
    for item in items:
        if blocks and blocks[-1][0].metrics.muscle == item.metrics.muscle:
            blocks[-1].append(item)
        else:
            blocks.append([item])
    pages: list[list[tuple[str, object]]] = []
    current: list[tuple[str, object]] = []
    for position, block in enumerate(blocks):
        rows: list[tuple[str, object]] = [("row", item) for item in block]
        addition = ([("group", title)] if position == 0 else []) + rows
        if current and not _fits(current + addition):
            pages.append(current)
            current = [("group", f"{title} (continued)")] + rows
        else:
            current = current + addition
    if current or not pages:
        pages.append(current)
    return pages


def _page_notes(entries: list[tuple[str, object]]) -> tuple[_Notes, list[tuple[str, bool]]]:
    """The footnote marks of a page's rows, and its notes wrapped: (text, whether general)."""
    notes = _Notes()
    rows = [value for kind, value in entries if kind == "row"]
    for item in rows:
        _row_cells(item, notes)
    general = _general_notes(rows)
    wrapped = [(_wrap(line, _NOTE_SIZE, PAGE_SHAPE[1] - 40), True) for line in general]
    wrapped += [(_wrap(line, _NOTE_SIZE, PAGE_SHAPE[1] - 40), False) for line in notes.lines()]
    return notes, wrapped


def _note_height(text: str) -> float:
    return _NOTE_LINE * (text.count("\n") + 1) + 5


def _fits(entries: list[tuple[str, object]]) -> bool:
    table = _HEADER_HEIGHT + _ROW_HEIGHT * len(entries)
    _, wrapped = _page_notes(entries)
    return _TABLE_TOP + table + 16 + sum(_note_height(t) for t, _ in wrapped) <= PAGE_SHAPE[0] - 8


def _table_page(figure, entries: list[tuple[str, object]], assessments: Sequence[Assessment]) -> None:
    notes, wrapped = _page_notes(entries)
    columns = _columns(assessments)
    width = sum(c[2] for c in columns)
    total = _HEADER_HEIGHT + _ROW_HEIGHT * max(len(entries), 1)
    table = figure.add_axes(_rect(16, _TABLE_TOP, width, total))
    table.set_axis_off()
    table.set_xlim(0, width)
    table.set_ylim(total, 0)
    table.add_patch(_rectangle((0, 0), width, _HEADER_HEIGHT, facecolor="#383838", edgecolor="none"))
    x = 0.0
    for _, header, column_width, align in columns:
        anchor = x + 8 if align == "left" else x + column_width - 8
        table.text(anchor, _HEADER_HEIGHT / 2, header, ha=align, va="center", color=_TEXT, fontsize=14,
                   fontweight="bold", linespacing=1.15)
        x += column_width
    y = _HEADER_HEIGHT
    shade = 0
    previous = None
    for kind, value in entries:
        if kind == "group":
            table.text(8, y + _ROW_HEIGHT / 2 + 2, value, ha="left", va="center", color="#ffd966", fontsize=16,
                       fontweight="bold")
            y += _ROW_HEIGHT
            previous = None
            continue
        item = value
        # A new muscle starts a new shade, so that its sides read as one block.
        if item.metrics.muscle != previous:
            shade += 1
        table.add_patch(_rectangle((0, y), width, _ROW_HEIGHT, facecolor=_ROW_SHADES[shade % 2], edgecolor="none"))
        cells = _row_cells(item, notes)
        if item.metrics.muscle == previous:
            cells["muscle"] = _Cell("")
        previous = item.metrics.muscle
        x = 0.0
        for key, _, column_width, align in columns:
            cell = cells[key]
            anchor = x + 8 if align == "left" else x + column_width - 8
            colour = _ALERT if cell.alert else (_MUTED if cell.muted else _TEXT)
            table.text(anchor, y + _ROW_HEIGHT / 2 + 1, cell.text, ha=align, va="center", color=colour,
                       fontsize=17, fontweight="bold" if cell.alert or key == "muscle" else "normal")
            x += column_width
        y += _ROW_HEIGHT
    if not entries:
        table.text(8, _HEADER_HEIGHT + _ROW_HEIGHT / 2, "No muscle was measured.", color=_ALERT, fontsize=17,
                   va="center")
    y = _TABLE_TOP + total + 16
    for text, general in wrapped:
        # Only a single row whose notes exceed a page can overflow; the rest is in the SR.
        if y + _note_height(text) > PAGE_SHAPE[0] - 8:
            _text_px(figure, 16, y, "\u2026 further notes in the structured report.", fontsize=_NOTE_SIZE,
                     color=_MUTED)
            break
        _text_px(figure, 16, y, text, fontsize=_NOTE_SIZE, color=_TEXT if general else _MUTED, linespacing=1.2)
        y += _note_height(text)


def _general_notes(assessments: Sequence[Assessment]) -> list[str]:
    lines = []
    methods = sorted({a.metrics.fat.method for a in assessments if a.metrics.fat is not None})
    for method in methods:
        eroded = any(a.metrics.fat.eroded for a in assessments if a.metrics.fat is not None
                     and a.metrics.fat.method == method)
        where = " (mean over the mask eroded by one pixel)" if eroded else ""
        lines.append(f"Fat %: {method.description}{where}. Lean CSA = CSA \u00d7 (1 \u2212 fat). "
                     "Asymmetry = (R \u2212 L) / mean(R, L) of the CSA. CSA is the mean over the slices that "
                     "contain the muscle.")
    if not methods:
        lines.append("No fat measurement for this series. CSA is the mean over the slices that contain the muscle.")
    kinds = {c.stratum.kind for a in assessments for c in (a.fat, a.csa) if c is not None and c.stratum is not None}
    if "published" in kinds or not kinds:
        lines.append("Published reference: z = (value \u2212 reference mean) / SD; pctl = percentile, from the normal "
                     "distribution of the z (an approximation for fat fractions).")
    if "site" in kinds:
        lines.append("Site reference (centile curves of age, sex, BMI and site): pctl = the value's centile for this "
                     "person, z = its normal quantile; outside the ages and BMIs of its cohort, no z.")
    lines.append("Red: fat z at least 2 (CSA z at most \u22122), or grade 2 or severe multifidus fat.")
    notes = sorted({a.levels_note for a in assessments if a.levels_note})
    lines.extend(note[0].upper() + note[1:] + "." for note in notes)
    grades = [a.grade for a in assessments if a.grade is not None and a.grade.graded]
    severe = [a.severe for a in assessments if a.severe is not None and a.severe.graded]
    if grades:
        lines.append(f"Grade (multifidus only): 0 <20 %, 1 20\u201350 %, 2 >50 % fat ({grades[0].citation}).")
    if severe:
        lines.append(f"SEVERE: multifidus fat \u226550 % on one side ({severe[0].citation}).")
    if any(("Dixon" in g.note) for g in grades + severe):
        lines.append("The grade cut-offs were defined on T2-weighted images; a Dixon fat fraction is a related but "
                     "different quantity.")
    return lines


# ---------------------------------------------------------------------------------------------
# Per vertebral level: one compact table


@dataclass(frozen=True)
class LevelValue:
    """One muscle side at one level, as the compact table shows it.

    Attributes
    ----------
    csa_mm2, fat_percent : float or None
        The level's mean CSA and fat; at a disc with a key slice, the key slice's (None where the
        muscle is not on the key slice, or has no fat measurement).
    assessment : Assessment
        The level group's row: its comparisons (a level-specific fat z), grade and fat note.
    """

    csa_mm2: float | None
    fat_percent: float | None
    assessment: Assessment

    @property
    def z(self) -> float | None:
        """The fat z against the reference of this level (None: no such reference)."""
        fat = self.assessment.fat
        return fat.z if fat is not None else None

    @property
    def alert(self) -> bool:
        """Red, as in the whole-series table: fat z at least 2, grade 2 or severe multifidus fat."""
        item = self.assessment
        return ((self.z is not None and self.z >= 2) or (item.grade is not None and item.grade.value == 2)
                or (item.severe is not None and item.severe.value is True))


@dataclass(frozen=True)
class LevelRow:
    """One level of the compact table.

    Attributes
    ----------
    level : str
        ``"L3"`` or ``"L3-L4"``.
    disc : bool
    slices : int
        Images of the series at this level on which a muscle was measured.
    key_frame : int or None
        At a disc, the frame of its key slice, whose values the row shows; None elsewhere, or at
        a disc without a key slice (the row then shows the disc's means).
    values : mapping of (Muscle, Laterality) to LevelValue
        Right and left side of each muscle measured at this level.
    """

    level: str
    disc: bool
    slices: int
    key_frame: int | None
    values: Mapping[tuple[Muscle, Laterality], LevelValue]


def level_rows(assessments: Sequence[Assessment]) -> list[LevelRow]:
    """The rows of the compact per-level table: one per level group, head to foot
    (:func:`level_order`); the whole series (``"all"``) is not among them."""
    groups: dict[str, list[Assessment]] = {}
    for item in assessments:
        if item.metrics.level != ALL_LEVELS:
            groups.setdefault(item.metrics.level, []).append(item)
    return [_level_row(level, groups[level]) for level in sorted(groups, key=level_order)]


def _level_row(level: str, items: Sequence[Assessment]) -> LevelRow:
    sides = [a for a in items if a.metrics.side is not Laterality.BOTH]
    disc = _is_disc(level)
    keys = [a.metrics.key_slice for a in sides if a.metrics.key_slice is not None]
    key_frame = keys[0].frame_index if disc and keys else None
    values: dict[tuple[Muscle, Laterality], LevelValue] = {}
    for item in sides:
        metrics = item.metrics
        if key_frame is not None:
            key = metrics.key_slice
            csa, fat = (key.area_mm2, key.fat_percent) if key is not None else (None, None)
        else:
            csa, fat = metrics.mean_csa_mm2, metrics.fat.mean_percent if metrics.fat is not None else None
        values[(metrics.muscle, metrics.side)] = LevelValue(csa, fat, item)
    frames = {area.frame_index for item in items for area in item.metrics.slices}
    return LevelRow(level, disc, len(frames), key_frame, values)


def _level_muscles(rows: Sequence[LevelRow]) -> list[Muscle]:
    """The muscles measured at any level, in their order."""
    return sorted({muscle for row in rows for muscle, _ in row.values}, key=lambda m: m.index)


def _compared_muscles(rows: Sequence[LevelRow]) -> frozenset[Muscle]:
    """Muscles with a level-specific fat comparison at some level: they get fat z columns."""
    return frozenset(muscle for row in rows for (muscle, _), value in row.values.items() if value.z is not None)


#: Compact table: widths of the level and slice-count columns, the narrowest value column (four
#: muscles' 16 values fit the page) and the widest (fewer muscles: spread, not stretched), px.
_LEVEL_WIDTH, _SLICES_WIDTH, _VALUE_WIDTH, _VALUE_WIDEST = 160, 64, 64, 100
#: Heights: muscle names above the column headers, the column headers, a body row, a disc row.
_LEVEL_NAMES, _LEVEL_HEADER, _BODY_ROW, _DISC_ROW = 32, 50, 38, 52
_LEVEL_GAP = 24
_SIDES = (Laterality.RIGHT, Laterality.LEFT)


def _block_columns(muscle: Muscle, compared: Collection[Muscle]) -> list[tuple[Muscle, str, Laterality]]:
    """A muscle's columns: CSA right, left; fat right, left; and fat z right, left when compared."""
    quantities = ("csa", "fat") + (("z",) if muscle in compared else ())
    return [(muscle, quantity, side) for quantity in quantities for side in _SIDES]


def _level_table_width(muscles: Sequence[Muscle], compared: Collection[Muscle]) -> float:
    columns = sum(len(_block_columns(m, compared)) for m in muscles)
    return _LEVEL_WIDTH + _SLICES_WIDTH + _VALUE_WIDTH * columns


def split_level_tables(muscles: Sequence[Muscle], compared: Collection[Muscle] = ()) -> list[tuple[Muscle, ...]]:
    """The muscles of each compact table: all in one when they fit the page's width; otherwise
    the paraspinal muscles (multifidus, erector spinae) and the others (psoas, quadratus
    lumborum) apart, and a muscle per table where even such a pair does not fit."""
    room = PAGE_SHAPE[1] - 32
    if _level_table_width(muscles, compared) <= room:
        return [tuple(muscles)] if muscles else []
    paraspinal = (Muscle.MULTIFIDUS, Muscle.ERECTOR_SPINAE)
    tables: list[tuple[Muscle, ...]] = []
    for group in ([m for m in muscles if m in paraspinal], [m for m in muscles if m not in paraspinal]):
        if group:
            fits = _level_table_width(group, compared) <= room
            tables.extend([tuple(group)] if fits else [(m,) for m in group])
    return tables


def _level_row_height(row: LevelRow) -> float:
    return _DISC_ROW if row.disc else _BODY_ROW


def _level_table_height(rows: Sequence[LevelRow]) -> float:
    return _LEVEL_NAMES + _LEVEL_HEADER + sum(_level_row_height(row) for row in rows)


def level_layout(rows: Sequence[LevelRow], tables: Sequence[tuple[Muscle, ...]],
                 room: float) -> list[list[tuple[tuple[Muscle, ...], list[LevelRow]]]]:
    """Pages of the compact tables: each a list of (muscles, rows) tables, top to bottom.

    Parameters
    ----------
    rows : sequence of LevelRow
        Head to foot (:func:`level_rows`).
    tables : sequence of tuple of Muscle
        The muscles of each table (:func:`split_level_tables`).
    room : float
        Height in page pixels that the tables may take on a page.

    Returns
    -------
    list of pages
        Tables follow each other on a page while they fit; a table that does not fit below
        another starts a new page, and one too long for a page continues on the next (its header
        repeated), so that every level is listed once per table.
    """
    pages: list[list[tuple[tuple[Muscle, ...], list[LevelRow]]]] = []
    current: list[tuple[tuple[Muscle, ...], list[LevelRow]]] = []
    used = 0.0
    for muscles in tables:
        remaining = list(rows)
        while remaining:
            gap = _LEVEL_GAP if current else 0.0
            count = 0
            while (count < len(remaining)
                   and used + gap + _level_table_height(remaining[:count + 1]) <= room):
                count += 1
            alone = _level_table_height(remaining) <= room
            if current and (count == 0 or (count < len(remaining) and alone)):
                pages.append(current)
                current, used = [], 0.0
                continue
            count = max(count, 1)  # a page too small for even one row still shows it
            current.append((muscles, remaining[:count]))
            used += gap + _level_table_height(remaining[:count])
            remaining = remaining[count:]
    if current:
        pages.append(current)
    return pages


def _level_cell(row: LevelRow, column: tuple[Muscle, str, Laterality], notes: _Notes) -> _Cell:
    muscle, quantity, side = column
    value = row.values.get((muscle, side))
    if value is None:
        return _Cell("\u2014", muted=True)
    if quantity == "csa":
        return _Cell(f"{value.csa_mm2:.0f}" if value.csa_mm2 is not None else "\u2014")
    fat = value.assessment.metrics.fat
    if quantity == "fat":
        if value.fat_percent is None:
            return _Cell("\u2014")
        text, muted = f"{value.fat_percent:.1f}", False
        if fat is not None and (not fat.reliable or fat.note):
            text += notes.reason(fat.note or "unreliable")
            muted = not fat.reliable
        return _Cell(text, value.alert, muted)
    if value.z is None:
        return _Cell("\u2014", muted=True)
    return _Cell(_signed(value.z, 1) + notes.reference(_stratum_text(value.assessment.fat)), value.z >= 2)


def _level_notes(rows: Sequence[LevelRow], whole: Sequence[Assessment]) -> list[str]:
    """The compact page's notes, once for the page: what the values are, the reference."""
    items = [value.assessment for row in rows for value in row.values.values()]
    methods = sorted({a.metrics.fat.method for a in items if a.metrics.fat is not None})
    fat = f"; fat %: {', '.join(m.description for m in methods)}" if methods else ""
    lines = [f"CSA mm\u00b2, mean over the level's slices{fat}. At a disc (blue rows): the values on its key slice, "
             "the image nearest the middle of the disc."]
    slice_levels = [row.level for row in rows if is_slice_level(row.level)]
    ranges = [row.level for row in rows if not is_slice_level(row.level)]
    if ranges:
        lines.append(f"{', '.join(ranges)}: every slice from the first body to the last, discs included, as the "
                     "published references measure over a range of levels.")
    comparisons = [a.fat for a in items if a.fat is not None]
    versions = sorted({c.reference_version for c in comparisons})
    fallback = next((a.levels for a in whole if a.levels), None)
    tail = (f"; all slices together are compared with the {fallback} reference (whole-series table)"
            if fallback else "")
    # Why a level was not compared when the reference does have that level (the patient, say).
    other = sorted({c.reason for c in comparisons if c.z is None and c.reason and not _no_level_reference(c)})
    if any(c.z is not None for c in comparisons):
        lines.append(f"Fat z: against {versions[0]}'s values for that level or range (letters below); \u2014 where "
                     f"there is none{tail}.")
    elif other:
        lines.append(f"Reference: no level compared ({'; '.join(other)}){tail}.")
    elif versions:
        lines.append(f"Reference: {versions[0]} has no per-level values for these muscles at these levels "
                     f"({slice_levels[0]} to {slice_levels[-1]}){tail}.")
    if any(value.alert for row in rows for value in row.values.values()):
        lines.append("Red: fat z at least 2, or grade 2 or severe multifidus fat over the level.")
    problems = next((a.levels_problems for a in items if a.levels_problems), ())
    if problems:
        lines.append(f"Levels: the level reference reports {'; '.join(problems)}. Check the levels on the sagittal "
                     "series.")
    return lines


def _no_level_reference(comparison: Comparison) -> bool:
    """Whether a comparison failed because the reference has no values over its levels (the
    reason :func:`reports.reference.compare` gives: "... reference over L2 (available: L1-L5)")."""
    return bool(comparison.reason) and f"reference over {comparison.levels} (" in comparison.reason


@dataclass(frozen=True)
class _LevelPage:
    """What a compact page shows: its tables, the muscles with fat z columns, the notes' room."""

    tables: list[tuple[tuple[Muscle, ...], list[LevelRow]]]
    compared: frozenset[Muscle]
    general: tuple[str, ...]


def _wrapped_notes(general: Sequence[str], notes: _Notes) -> list[tuple[str, bool]]:
    width = PAGE_SHAPE[1] - 40
    return ([(_wrap(line, _NOTE_SIZE, width), True) for line in general]
            + [(_wrap(line, _NOTE_SIZE, width), False) for line in notes.lines()])


def _level_pages(assessments: Sequence[Assessment]) -> list[_LevelPage]:
    """The compact per-level pages: none without levels, one unless the levels do not fit."""
    rows = level_rows(assessments)
    if not rows:
        return []
    compared = _compared_muscles(rows)
    tables = split_level_tables(_level_muscles(rows), compared)
    general = tuple(_level_notes(rows, _whole_series(assessments)))
    # Room for the notes of every row, so that no page's notes (a part of them) are cut off.
    notes = _Notes()
    for muscles in tables:
        for row in rows:
            for muscle in muscles:
                for column in _block_columns(muscle, compared):
                    _level_cell(row, column, notes)
    notes_height = 16 + sum(_note_height(text) for text, _ in _wrapped_notes(general, notes))
    room = PAGE_SHAPE[0] - 8 - _TABLE_TOP - notes_height
    return [_LevelPage(page, compared, general) for page in level_layout(rows, tables, room)]


def _level_columns(muscles: Sequence[Muscle], compared: Collection[Muscle]) -> tuple[list, float]:
    """The value columns of a table and their width (widened up to :data:`_VALUE_WIDEST`)."""
    columns = [column for muscle in muscles for column in _block_columns(muscle, compared)]
    spare = PAGE_SHAPE[1] - 32 - _LEVEL_WIDTH - _SLICES_WIDTH
    return columns, min(_VALUE_WIDEST, spare / max(len(columns), 1))


def _draw_level_table(figure, top: float, muscles: Sequence[Muscle], rows: Sequence[LevelRow],
                      compared: Collection[Muscle], notes: _Notes) -> None:
    columns, step = _level_columns(muscles, compared)
    width = _LEVEL_WIDTH + _SLICES_WIDTH + step * len(columns)
    height = _level_table_height(rows)
    table = figure.add_axes(_rect(16, top, width, height))
    table.set_axis_off()
    table.set_xlim(0, width)
    table.set_ylim(height, 0)
    head = _LEVEL_NAMES + _LEVEL_HEADER
    table.add_patch(_rectangle((0, 0), width, head, facecolor="#383838", edgecolor="none"))
    bold = dict(color=_TEXT, fontsize=14, fontweight="bold", va="center", linespacing=1.15)
    table.text(8, _LEVEL_NAMES + _LEVEL_HEADER / 2, "Level", ha="left", **bold)
    table.text(_LEVEL_WIDTH + _SLICES_WIDTH - 8, _LEVEL_NAMES + _LEVEL_HEADER / 2, "Slices", ha="right", **bold)
    # Each quantity over its right and left columns, the side under it: narrow columns stay legible.
    headers = {"csa": "CSA mm\u00b2", "fat": "Fat %", "z": "Fat z"}
    half = _LEVEL_NAMES + _LEVEL_HEADER / 2
    x = _LEVEL_WIDTH + _SLICES_WIDTH
    table.plot([x, x], [0, height], color="#606060", linewidth=1)
    for muscle in muscles:
        block = [c for c in columns if c[0] == muscle]
        table.text(x + step * len(block) / 2, _LEVEL_NAMES / 2 + 2, muscle.display, ha="center", **bold)
        for number, side in enumerate(_SIDES):  # the outline colours under the name: right, left
            table.add_patch(_rectangle((x + 8 + number * (step * len(block) - 16) / 2, _LEVEL_NAMES - 4),
                                       (step * len(block) - 16) / 2, 4, facecolor=_colour(muscle, side),
                                       edgecolor="none"))
        for _, quantity, side in block:
            if side is _SIDES[0]:
                table.text(x + step, half - 1, headers[quantity], ha="center", **{**bold, "va": "bottom"})
            table.text(x + step - 8, half + 2, side.letter, ha="right", **{**bold, "va": "top"})
            x += step
        table.plot([x, x], [0, height], color="#606060", linewidth=1)
    y = head
    bodies = 0
    for row in rows:
        row_height = _level_row_height(row)
        shade = _DISC_BAND if row.disc else _ROW_SHADES[bodies % 2]
        bodies += not row.disc
        table.add_patch(_rectangle((0, y), width, row_height, facecolor=shade, edgecolor="none"))
        middle = y + row_height / 2 + 1
        if row.disc:
            table.text(26, y + 5, row.level, ha="left", va="top", color=_DISC_NAME, fontsize=16, fontweight="bold")
            under = f"key slice, image {row.key_frame + 1}" if row.key_frame is not None else "mean (no key slice)"
            table.text(26, y + row_height - 5, under, ha="left", va="bottom", color=_DISC_NAME, fontsize=12)
        else:
            table.text(8, middle, row.level, ha="left", va="center", color=_BODY_NAME, fontsize=16,
                       fontweight="bold")
        table.text(_LEVEL_WIDTH + _SLICES_WIDTH - 8, middle, str(row.slices), ha="right", va="center",
                   color=_TEXT, fontsize=16)
        x = _LEVEL_WIDTH + _SLICES_WIDTH
        for column in columns:
            cell = _level_cell(row, column, notes)
            colour = _ALERT if cell.alert else (_MUTED if cell.muted else _TEXT)
            table.text(x + step - 8, middle, cell.text, ha="right", va="center", color=colour, fontsize=16,
                       fontweight="bold" if cell.alert else "normal")
            x += step
        y += row_height


def _level_page(figure, page: _LevelPage) -> None:
    notes = _Notes()
    top = _TABLE_TOP
    for muscles, rows in page.tables:
        _draw_level_table(figure, top, muscles, rows, page.compared, notes)
        top += _level_table_height(rows) + _LEVEL_GAP
    y = top - _LEVEL_GAP + 16
    for text, general in _wrapped_notes(page.general, notes):
        _text_px(figure, 16, y, text, fontsize=_NOTE_SIZE, color=_TEXT if general else _MUTED, linespacing=1.2)
        y += _note_height(text)


# ---------------------------------------------------------------------------------------------
# Page 3: charts


def _chart_rows(assessments: Sequence[Assessment]) -> list[Assessment]:
    chosen = [a for a in assessments if a.metrics.level == ALL_LEVELS]
    # Right before left, as on the page's outlines; both sides together last.
    return sorted(chosen, key=lambda a: (a.metrics.muscle.index, a.metrics.side is Laterality.BOTH,
                                         a.metrics.side is Laterality.LEFT))


def _style_axes(ax) -> None:
    ax.set_facecolor(_BACKGROUND)
    for name, spine in ax.spines.items():
        spine.set_color("#808080")
        spine.set_visible(name in ("left", "bottom"))
    ax.tick_params(colors=_TEXT, labelsize=13)
    ax.xaxis.label.set_color(_TEXT)
    ax.yaxis.label.set_color(_TEXT)


def _band_chart(ax, rows: Sequence[Assessment], which: str, xlabel: str, *, labels: bool) -> None:
    """Values as points on their reference bands (mean, +-1 SD, +-2 SD), one row per muscle side."""
    _style_axes(ax)
    values, extents = [], []
    compared = [item.fat if which == "fat" else item.csa for item in rows]
    any_reference = any(c is not None and c.z is not None for c in compared)
    for position, (item, comparison) in enumerate(zip(rows, compared)):
        metrics = item.metrics
        value = metrics.fat.mean_percent if which == "fat" else metrics.mean_csa_mm2
        if comparison is not None and comparison.z is not None:
            stratum = comparison.stratum
            low2, low1, middle, high1, high2 = (stratum.at(z) for z in (-2.0, -1.0, 0.0, 1.0, 2.0))
            ax.add_patch(_rectangle((low2, position - 0.38), high2 - low2, 0.76, facecolor=_BAND_2SD,
                                    edgecolor="none", zorder=1))
            ax.add_patch(_rectangle((low1, position - 0.38), high1 - low1, 0.76, facecolor=_BAND_1SD,
                                    edgecolor="none", zorder=2))
            ax.plot([middle, middle], [position - 0.38, position + 0.38], color=_MEAN_LINE, linewidth=2, zorder=3)
            extents.append(high2 + 0.1 * (high2 - middle))
            alert = comparison.z >= 2 if which == "fat" else comparison.z <= -2
            note, colour = f"z {_signed(comparison.z, 1)}", _ALERT if alert else _TEXT
        else:
            # When nothing in the chart has a reference, one note below says so instead of every row.
            note, colour = ("no ref.", _MUTED) if any_reference else ("", _MUTED)
        if note:
            ax.text(1.02, position, note, transform=ax.get_yaxis_transform(), ha="left", va="center",
                    fontsize=13, color=colour, clip_on=False,
                    fontweight="bold" if colour == _ALERT else "normal")
        if value is None:
            continue
        values.append(value)
        marker = "D" if metrics.side is Laterality.BOTH else "o"
        size = 12 if len(rows) <= 6 else 10
        ax.plot([value], [position], marker=marker, markersize=size, color=_colour(metrics.muscle, metrics.side),
                markeredgecolor="white", markeredgewidth=1.5, zorder=5, linestyle="none")
    top = max(values + extents + [1.0])
    ax.set_xlim(0, top * 1.08)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)))
    if labels:
        ax.set_yticklabels([f"{a.metrics.muscle.short} {a.metrics.side.letter}" for a in rows],
                           fontsize=13 if len(rows) <= 8 else 12)
    else:
        ax.set_yticklabels([])
    ax.set_xlabel(xlabel, fontsize=14)
    ax.grid(axis="x", color="#303030", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for position in range(1, len(rows)):
        if rows[position].metrics.muscle != rows[position - 1].metrics.muscle:
            ax.axhline(position - 0.5, color="#707070", linewidth=1)


#: Level bands of the slice-by-slice chart: vertebral bodies alternate two greys, discs are blue.
_BODY_BANDS = ("#242424", "#383838")
_DISC_BAND = "#173a5e"
_BODY_NAME = "#ffd966"
_DISC_NAME = "#8ec5ff"


def level_bands(heights: Mapping[str, Sequence[float]]) -> list[tuple[str, float, float]]:
    """Head-foot bands of the levels, for shading a chart whose vertical axis is the height.

    Parameters
    ----------
    heights : mapping of str to sequence of float
        Level name to the heights (LPS z, mm, +z to the head) of its slices.

    Returns
    -------
    list of (str, float, float)
        ``(name, bottom, top)`` head to foot (by the middle of each level's heights). Neighbours
        at most 1.5 slice steps apart (the median step between all the heights) meet half-way
        between their nearest slices; otherwise, and at the ends, a band reaches half a step
        beyond its outermost slices (1 mm when no step is known).
    """
    spans = sorted(((name, min(z), max(z)) for name, z in heights.items() if len(z)),
                   key=lambda span: (-(span[1] + span[2]) / 2, span[0]))
    every = np.unique(np.concatenate([np.asarray(z, dtype=float) for z in heights.values()] + [np.zeros(0)]))
    steps = np.diff(every)
    steps = steps[steps > 1e-3]
    step = float(np.median(steps)) if steps.size else 2.0
    bounds = [[low - step / 2, high + step / 2] for _, low, high in spans]
    for k in range(len(spans) - 1):
        (_, low_upper, _), (_, _, high_lower) = spans[k], spans[k + 1]
        if low_upper - high_lower <= 1.5 * step:
            middle = (low_upper + high_lower) / 2
            bounds[k][0] = min(middle, bounds[k][1])
            bounds[k + 1][1] = max(middle, bounds[k + 1][0])
    return [(name, bottom, top) for (name, _, _), (bottom, top) in zip(spans, bounds)]


def _draw_level_bands(ax, bands: Sequence[tuple[str, float, float]]) -> None:
    """Shade each level's band under the curves and name it inside the band's right end."""
    bodies = 0
    for name, bottom, top in bands:
        disc = _is_disc(name)
        colour = _DISC_BAND if disc else _BODY_BANDS[bodies % 2]
        bodies += not disc
        ax.axhspan(bottom, top, facecolor=colour, edgecolor="none", zorder=-1)
        ax.text(0.985, (bottom + top) / 2, name, transform=ax.get_yaxis_transform(), ha="right", va="center",
                color=_DISC_NAME if disc else _BODY_NAME, fontsize=12, fontweight="bold" if disc else "normal",
                zorder=4, clip_on=True)


def _profile_chart(ax, muscle: Muscle, rows: Sequence[Assessment], show_ylabel: bool) -> None:
    """CSA of each slice against its head-foot position, left and right, on bands of the levels
    (:func:`level_bands`) when the slices' levels are known."""
    _style_axes(ax)
    ax.tick_params(labelsize=12)
    levels: dict[str, list[float]] = {}
    widest = 0.0
    for item in rows:
        metrics = item.metrics
        if metrics.muscle != muscle or metrics.side is Laterality.BOTH:
            continue
        ordered = sorted(metrics.slices, key=lambda s: s.centroid_lps[2])
        widest = max([widest] + [s.area_mm2 for s in ordered])
        ax.plot([s.area_mm2 for s in ordered], [s.centroid_lps[2] for s in ordered],
                color=_colour(muscle, metrics.side), linewidth=2.5,
                marker="o" if metrics.side is Laterality.RIGHT else "s", markersize=6, markeredgecolor="black",
                markeredgewidth=0.6, zorder=3)
        for area in metrics.slices:
            if area.level:
                levels.setdefault(area.level, []).append(area.centroid_lps[2])
    ax.set_title(muscle.display, color=_TEXT, fontsize=15, pad=6)
    ax.set_xlabel("CSA per slice, mm\u00b2", fontsize=13)
    if show_ylabel:
        ax.set_ylabel("z (head +), mm", fontsize=13)
    ax.grid(color="#303030", linewidth=0.8, zorder=0)
    if levels:
        # A lane on the right for the level names, clear of the curves.
        ax.set_xlim(0, max(widest, 1.0) * 1.3)
        _draw_level_bands(ax, level_bands(levels))
    else:
        ax.set_xlim(left=0)


def _chart_page(figure, assessments: Sequence[Assessment]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = _chart_rows(assessments)
    fat_rows = [a for a in rows if a.metrics.fat is not None and a.metrics.fat.mean_percent is not None]
    key = [Patch(facecolor=_BAND_1SD, label="z \u22121 to +1"),
           Patch(facecolor=_BAND_2SD, label="z \u22122 to +2"),
           Line2D([], [], color=_MEAN_LINE, linewidth=2, label="z 0 (mean or median)"),
           Line2D([], [], marker="D", color="#909090", markeredgecolor="white", linestyle="none", markersize=10,
                  label="L+R together")]
    figure.legend(handles=key, loc="upper left", bbox_to_anchor=(10 / PAGE_SHAPE[1], 1 - 136 / PAGE_SHAPE[0]),
                  ncol=4, fontsize=13, frameon=False, labelcolor=_TEXT, handlelength=1.6, columnspacing=1.6)
    top = 214
    band_height = min(300, 40 + 30 * max(len(rows), 1))
    # The area chart repeats the fat chart's rows, so it shares their labels when they are the same.
    shared_labels = bool(fat_rows) and [id(a) for a in fat_rows] == [id(a) for a in rows]
    fat_ax = figure.add_axes(_rect(215, top, 345, band_height))
    if fat_rows:
        quantity = {a.metrics.fat.quantity for a in fat_rows}
        xlabel = "Fat fraction, %" if quantity == {FatQuantity.FAT_FRACTION} else "Fat infiltration, %"
        _band_chart(fat_ax, fat_rows, "fat", xlabel, labels=True)
        fat_ax.set_title("Fat vs reference", color=_TEXT, fontsize=16, fontweight="bold", pad=10, loc="left")
        if all(a.fat is None or a.fat.z is None for a in fat_rows):
            _text_px(figure, 215, top + band_height + 58, "No fat reference for these values (see the table).",
                     fontsize=13, color=_MUTED)
    else:
        fat_ax.set_axis_off()
        fat_ax.text(0.5, 0.5, "No fat measurement for this series", ha="center", color=_MUTED, fontsize=15,
                    transform=fat_ax.transAxes)
    csa_left = 680 if shared_labels else 860
    csa_ax = figure.add_axes(_rect(csa_left, top, 1180 - csa_left, band_height))
    if rows:
        _band_chart(csa_ax, rows, "csa", "Mean CSA, mm\u00b2", labels=not shared_labels)
    csa_ax.set_title("Area vs reference", color=_TEXT, fontsize=16, fontweight="bold", pad=10, loc="left")
    if rows and all(a.csa is None or a.csa.z is None for a in rows):
        version = next((a.csa.reference_version for a in rows if a.csa is not None), "the reference")
        _text_px(figure, csa_left, top + band_height + 58,
                 _wrap(f"No CSA reference in {version} for these muscles (see the table).", 13,
                       PAGE_SHAPE[1] - csa_left - 16, indent=""), fontsize=13, color=_MUTED)
    muscles = sorted({a.metrics.muscle for a in rows}, key=lambda m: m.index)
    heading = top + band_height + 100
    _text_px(figure, 16, heading, "Area slice by slice, head (top) to foot", fontsize=16, fontweight="bold")
    sides = [Line2D([], [], marker="o", color="#d0d0d0", markeredgecolor="black", linewidth=2.5, markersize=8,
                    label="right (deep shade)"),
             Line2D([], [], marker="s", color="#d0d0d0", markeredgecolor="black", linewidth=2.5, markersize=8,
                    label="left (light shade)")]
    if any(area.level for a in rows for area in a.metrics.slices):
        sides += [Patch(facecolor=_BODY_BANDS[1], edgecolor=_BODY_NAME, label="vertebral body"),
                  Patch(facecolor=_DISC_BAND, edgecolor=_DISC_NAME, label="disc")]
    # One row, so that it stays clear of the panels' titles below it.
    figure.legend(handles=sides, loc="upper left",
                  bbox_to_anchor=((560 if len(sides) == 2 else 500) / PAGE_SHAPE[1], 1 - (heading - 6) / PAGE_SHAPE[0]),
                  ncol=len(sides), fontsize=13, frameon=False, labelcolor=_TEXT, handlelength=2.2,
                  columnspacing=1.6 if len(sides) == 2 else 1.0)
    if not muscles:
        return
    profile_top = heading + 62
    profile_height = PAGE_SHAPE[0] - profile_top - 62
    gap = 56
    width = (PAGE_SHAPE[1] - 110 - 40 - gap * (len(muscles) - 1)) / len(muscles)
    shared = None
    for number, muscle in enumerate(muscles):
        ax = figure.add_axes(_rect(110 + number * (width + gap), profile_top, width, profile_height), sharey=shared)
        shared = shared or ax
        _profile_chart(ax, muscle, rows, number == 0)
        if number:
            # The height axis is shared: its numbers once, and room for the level names between panels.
            ax.tick_params(labelleft=False)


# ---------------------------------------------------------------------------------------------
# Page 4 (with a site reference): centile curves


def _centile_panels(assessments: Sequence[Assessment]) -> list[tuple[str, list[Assessment]]]:
    """(measurement, rows) per muscle whose sides were compared with a site reference's curves."""
    panels: dict[tuple[Muscle, str], list[Assessment]] = {}
    for item in _chart_rows(assessments):
        if item.metrics.side is Laterality.BOTH:
            continue
        for which, comparison in (("fat", item.fat), ("csa", item.csa)):
            if comparison is not None and comparison.stratum is not None and comparison.stratum.curves is not None:
                panels.setdefault((item.metrics.muscle, which), []).append(item)
    order = sorted(panels, key=lambda key: (key[1] != "fat", key[0].index))
    return [(which, panels[(muscle, which)]) for muscle, which in order]


def _centile_chart(ax, which: str, rows: Sequence[Assessment]) -> None:
    """The site reference's centile curves against age, with the person's sides as points."""
    _style_axes(ax)
    first = rows[0]
    comparison = first.fat if which == "fat" else first.csa
    curves = comparison.stratum.curves
    styles = {50.0: ("-", 2.6), 25.0: ("--", 1.6), 75.0: ("--", 1.6)}
    for centile, values in zip(curves.centiles, curves.values):
        style, width = styles.get(centile, (":", 1.6))
        ax.plot(curves.ages, values, color=_MEAN_LINE, linestyle=style, linewidth=width, zorder=2)
        ax.text(curves.ages[-1], values[-1], f" P{centile:g}", color=_MUTED, fontsize=11, va="center", ha="left",
                clip_on=False)
    for item in rows:
        compared = item.fat if which == "fat" else item.csa
        value = item.metrics.fat.mean_percent if which == "fat" else item.metrics.mean_csa_mm2
        age = compared.stratum.curves.age
        ax.plot([age], [value], marker="o" if item.metrics.side is Laterality.RIGHT else "s", markersize=11,
                color=_colour(item.metrics.muscle, item.metrics.side), markeredgecolor="white", markeredgewidth=1.5,
                linestyle="none", zorder=5)
    muscle = first.metrics.muscle.display
    quantity = "fat, %" if which == "fat" else "mean CSA, mm\u00b2"
    ax.set_title(f"{muscle} {quantity}", color=_TEXT, fontsize=15, pad=6, loc="left")
    ax.set_xlabel("age, years", fontsize=13)
    ax.grid(color="#303030", linewidth=0.8, zorder=0)


def _centile_page(figure, assessments: Sequence[Assessment]) -> None:
    panels = _centile_panels(assessments)
    first = panels[0][1][0]
    comparison = first.fat if panels[0][0] == "fat" else first.csa
    stratum = comparison.stratum
    _text_px(figure, 16, 150, _wrap(f"Site reference {stratum.version}: centile curves P5, P25, P50, P75, P95 for "
                                    f"{stratum.curves.who}; the person's right (circle) and left (square) sides "
                                    "at their age.", 14, PAGE_SHAPE[1] - 32, indent=""), fontsize=14)
    columns = 2 if len(panels) > 1 else 1
    lines = -(-len(panels) // columns)
    top, bottom, left, gap = 230, 60, 110, 130
    width = (PAGE_SHAPE[1] - left - 90 - gap * (columns - 1)) / columns
    height = (PAGE_SHAPE[0] - top - bottom - 90 * (lines - 1)) / lines
    for number, (which, rows) in enumerate(panels):
        row, column = divmod(number, columns)
        ax = figure.add_axes(_rect(left + column * (width + gap), top + row * (height + 90), width, height))
        _centile_chart(ax, which, rows)


# ---------------------------------------------------------------------------------------------


def render_pages(
    label_map: LabelMap,
    assessments: Sequence[Assessment],
    patient: PatientContext,
    *,
    model_name: str,
    model_version: str,
    software_version: str,
    quality: SegmentationQuality | None = None,
) -> list[Page]:
    """Draw the summary pages.

    Parameters
    ----------
    label_map : LabelMap
        The segmentation and the series it lies on (the key slices are drawn from its frames).
    assessments : sequence of Assessment
        From :func:`reports.assessment.assess`, any level groups.
    patient : PatientContext
        Age, sex and BMI for the header.
    model_name, model_version : str
        The segmentation model (from its card).
    software_version : str
        musclenode's version.
    quality : SegmentationQuality, optional
        The segmentation's verdict: excluded images are marked on the key-slice page and named
        in its notes; a series "not measured" gets that one page, saying so and why, and no
        numbers.

    Returns
    -------
    list of Page
        Key slices; the whole series' measurement table; with levels, the compact table per
        vertebral level (:func:`level_rows`, one page unless the levels do not fit); the charts;
        the centile charts with a site reference. Each page is uint8 RGB :data:`PAGE_SHAPE`.
    """
    import matplotlib

    if quality is not None and not quality.measured:
        plan: list[tuple[str, str, object]] = [("slices", "Not measured: the segmentation failed quality control",
                                                None)]
    else:
        tables = _table_pages(assessments)
        plan = [("slices", "Key slices with muscle outlines", None)]
        for number, entries in enumerate(tables, start=1):
            suffix = f" ({number} of {len(tables)})" if len(tables) > 1 else ""
            plan.append(("table", f"Measurements and reference{suffix}", entries))
        levels = _level_pages(assessments)
        for number, page in enumerate(levels, start=1):
            suffix = f" ({number} of {len(levels)})" if len(levels) > 1 else ""
            plan.append(("levels", f"Per vertebral level{suffix}", page))
        plan.append(("charts", "Charts: fat and area against the reference", None))
        if _centile_panels(assessments):
            plan.append(("centiles", "Centile charts: the site reference's curves", None))
    context = _Context(
        patient_line=_patient_line(patient),
        study_line=_study_line(label_map.series),
        model_line=(f"Segmentation: {model_name} {model_version} (automatic)   \u00b7   "
                    f"Software: musclenode {software_version}"),
        page_count=len(plan),
    )
    pages = []
    # Fixed style, independent of any matplotlibrc on the machine.
    style = {"font.family": "DejaVu Sans", "text.antialiased": True, "lines.antialiased": True,
             "axes.unicode_minus": True, "mathtext.default": "regular", "text.parse_math": False}
    with matplotlib.rc_context(style):
        for number, (kind, title, entries) in enumerate(plan, start=1):
            figure = _figure()
            _header(figure, context, number, title)
            frames: tuple[int, ...] = ()
            if kind == "slices":
                shown = _shown_frames(label_map, assessments, quality)
                frames = tuple(frame for frame, _ in shown)
                _key_slice_page(figure, label_map, assessments, quality, shown)
            elif kind == "table":
                _table_page(figure, entries, assessments)
            elif kind == "levels":
                _level_page(figure, entries)
            elif kind == "charts":
                _chart_page(figure, assessments)
            else:
                _centile_page(figure, assessments)
            pages.append(Page(_ascii_title(number, len(plan), title), _pixels(figure), frames))
    return pages


def _ascii_title(number: int, count: int, title: str) -> str:
    return f"Page {number} of {count}: {title}. {RESEARCH_USE.replace(chr(0x2014), '-')}."
