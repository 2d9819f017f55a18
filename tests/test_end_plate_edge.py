"""The image's own end plates (:mod:`inference.end_plate_edge`) and how they move the model's
(:func:`inference.vertebrae.place_end_plates`), on synthetic sagittal images with a known edge."""

from __future__ import annotations

import numpy as np
import pytest

from inference.card import KIND_VERTEBRAE
from inference.end_plate_edge import EdgeSettings, edge_position, end_plate_profile
from inference.geometry import FrameGeometry
from inference.registry import DEFAULT_LEVEL_MODEL, load_model
from inference.vertebrae import Body, place_end_plates
from inference.vocabulary import Vertebra

PIXEL_MM = 0.9
ROWS = COLUMNS = 120
#: Head-foot position (LPS z, mm) of the edge between body (below) and disc (above): halfway
#: between pixel rows 49 and 50 of the frame below.
EDGE_Z = -(49.5 * PIXEL_MM)
UP = np.array([0.0, 0.0, 1.0])
#: Along the end plate in the sagittal plane (anterior-posterior).
ACROSS = np.array([0.0, 1.0, 0.0])


def _sagittal(body: float, disc: float, noise: float = 0.0) -> tuple[FrameGeometry, np.ndarray]:
    """A sagittal frame (rows to the feet, columns to posterior, pixel (0, 0) at z 0) whose rows
    above :data:`EDGE_Z` show the disc and those below the body."""
    frame = FrameGeometry((0.0, -COLUMNS / 2 * PIXEL_MM, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0),
                          (PIXEL_MM, PIXEL_MM), ROWS, COLUMNS)
    z = -np.arange(ROWS) * PIXEL_MM
    image = np.where(z[:, None] > EDGE_Z, disc, body) * np.ones((1, COLUMNS))
    rng = np.random.default_rng(0)
    return frame, (image + noise * rng.standard_normal(image.shape)).astype(np.float32)


@pytest.mark.parametrize("model_error_mm", [-2.0, -0.6, 0.0, 1.3, 3.0])
def test_edge_found_where_the_disc_begins(model_error_mm):
    # The model's superior end plate lies model_error_mm beyond (above) the true edge; the steepest
    # rise is found where the edge is, on a T2-like image (disc twice as bright as the body).
    frame, image = _sagittal(body=100.0, disc=220.0, noise=3.0)
    centre = np.array([0.0, 0.0, EDGE_Z + model_error_mm])
    profile = end_plate_profile(image, frame, centre, UP, ACROSS, superior=True)
    position, ratio = edge_position(profile, EdgeSettings({}))
    assert position == pytest.approx(-model_error_mm, abs=0.3)
    assert ratio == pytest.approx(2.2, abs=0.1)


def test_inferior_end_plate_looks_towards_the_feet():
    # Body above the edge, disc below: the inferior end plate of the upper body.
    frame, image = _sagittal(body=100.0, disc=220.0)
    image = image[::-1].copy()  # rows upside down: the body above row 69.5, the disc below it
    edge_z = -(69.5 * PIXEL_MM)
    centre = np.array([0.0, 0.0, edge_z - 1.0])  # the model's inferior end plate 1 mm too low
    profile = end_plate_profile(image, frame, centre, UP, ACROSS, superior=False)
    position, _ = edge_position(profile, EdgeSettings({}))
    assert position == pytest.approx(-1.0, abs=0.3)


def test_no_edge_where_the_disc_is_not_brighter():
    # T1-like (disc darker than marrow) and a flat image: nothing to find, the model's plate stays.
    settings = EdgeSettings({})
    for body, disc in ((220.0, 100.0), (150.0, 150.0)):
        frame, image = _sagittal(body=body, disc=disc)
        profile = end_plate_profile(image, frame, np.array([0.0, 0.0, EDGE_Z]), UP, ACROSS, superior=True)
        assert edge_position(profile, settings)[0] is None


def test_no_edge_outside_the_image():
    frame, image = _sagittal(body=100.0, disc=220.0)
    # An end plate 10 mm above the frame's top row: most of the profile has no pixels.
    profile = end_plate_profile(image, frame, np.array([0.0, 0.0, 10.0]), UP, ACROSS, superior=True)
    assert np.isnan(profile).mean() > 0.2
    assert edge_position(profile, EdgeSettings({})) == (None, pytest.approx(float("nan"), nan_ok=True))


def _body() -> Body:
    return Body(Vertebra.L3, np.array([0.0, 0.0, -15.0]), np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, -30.0]),
                UP, UP, 30.0, 1.0)


def test_place_end_plates_averages_model_and_image():
    settings = EdgeSettings({"offset_mm": [1.0, 1.5], "weight": 0.5, "max_move_mm": 3.0})
    # Model offsets move the plates 0.5 mm (superior) and 1.0 mm (inferior) into the body: z -0.5
    # and -29.0. The image's steepest rise lies 2.0 mm above the superior plate, 1.0 mm beyond the
    # labelled edge (its offset): z +1.0; and 0.5 mm below the inferior plate, 1.5 mm beyond: z -29.0.
    placed = place_end_plates(_body(), (0.5, 1.0), (2.0, 0.5), settings)
    assert placed.superior[2] == pytest.approx((-0.5 + 1.0) / 2)
    assert placed.inferior[2] == pytest.approx((-29.0 + -29.0) / 2)
    assert np.allclose(placed.centroid, _body().centroid)


def test_place_end_plates_keeps_the_model_where_the_image_says_nothing_or_too_much():
    settings = EdgeSettings({"offset_mm": [1.0, 1.5], "weight": 0.5, "max_move_mm": 3.0})
    # No superior edge; an inferior edge 5.5 mm beyond the model's plate (4 mm after its offset): a
    # farther edge (the other side of a thin disc), not this plate.
    placed = place_end_plates(_body(), (0.5, 1.0), (None, 5.5), settings)
    assert placed.superior[2] == pytest.approx(-0.5)
    assert placed.inferior[2] == pytest.approx(-29.0)
    # Without the card's end_plate_edge: the model's plates with their offsets.
    assert place_end_plates(_body(), (0.5, 1.0), (2.0, 0.5), None).superior[2] == pytest.approx(-0.5)


def test_card_carries_the_edge_measured_on_training_subjects():
    card = load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE, verify=False)
    edge = card.postprocess["end_plate_edge"]
    calibration = card.postprocess["calibration"]
    assert 0.0 < edge["weight"] <= 1.0
    # The weight chosen is the best of those tried on training subjects, and better than none.
    tried = calibration["right_by_edge_weight"]
    assert tried[str(edge["weight"])] == max(tried.values()) > tried["0.0"]
    # The image's edges scatter less than the model's end plates (sd, mm) on training subjects.
    for side in ("superior", "inferior"):
        assert calibration["edge_errors_mm"][side]["sd"] < calibration["end_plate_errors_mm"][side]["sd"]
    assert set(calibration["subjects"]) <= set(card.training["subjects_trained"])
