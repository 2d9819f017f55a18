"""Vertebral levels: the level model's card, the mapping of slices to levels, and ``musclenode levels``.

The data tests build DICOM studies from held-out subjects of ``../shared/data/vertebrae`` (never
trained on: :func:`inference.training.vertebrae.split_subjects`): a sagittal T2 series and axial
series (straight, tilted 15 degrees, two angled slabs) resliced from the same volume in one frame
of reference; the labels give the true level of every axial slice
(:func:`inference.training.vertebrae_eval.true_level`). They fail, not skip, under ``CI`` when the
data are missing (:func:`tests.studies.require_data`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inference.card import KIND_MUSCLES, KIND_VERTEBRAE, CardError, ModelCard
from inference.geometry import FrameGeometry, read_series
from inference.registry import DEFAULT_LEVEL_MODEL, DEFAULT_MODEL, load_model, scan_models
from inference.vertebrae import (
    Body,
    LevelReference,
    assign_levels,
    axis_position,
    disc_key_frames,
    end_plate_offsets,
    find_bodies,
    level_of,
    name_candidates,
    plane_crossing,
    spine_axis,
)
from inference.vocabulary import Level, Vertebra
from tests.studies import require_data, vertebrae_files, write_vertebrae_study

#: Held-out subjects the data tests use: two of each set.
SUBJECTS = ("myosegmentum-07", "myosegmentum-34", "zukic-10", "zukic-19")
#: Share of axial slices that must get the right level: 442/465 = 0.951 measured through DICOM with
#: model 1.0.0, the axis through the bodies' centroids and end plates half the model's (with its
#: offsets), half the image's steepest rise into the disc (429/465 = 0.923 with the model's alone;
#: README "Vertebral levels"). The margin allows a few slices on end plates to flip on other CPUs.
MIN_LEVEL_ACCURACY = 0.94


# ---------------------------------------------------------------------------------------------
# Card and registry


def test_level_model_card_is_its_own_kind():
    card = load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE)
    assert card.kind == KIND_VERTEBRAE
    assert [card.labels[v].vertebra for v in card.output_labels] == [
        Vertebra.T11, Vertebra.T12, Vertebra.L1, Vertebra.L2, Vertebra.L3, Vertebra.L4, Vertebra.L5]
    assert card.onnx_path.stat().st_size < 5e6
    references = " ".join(card.provenance["references"])
    assert "BMC Musculoskelet Disord 2019;20:152" in references and "Computer Graphics Forum 2014;33" in references
    assert "S1 is NOT named" in card.provenance["use"]
    accuracy = card.accuracy
    assert {"myosegmentum", "zukic"} <= set(accuracy["dice"])
    held_out = set(accuracy["held_out_subjects"])
    assert any(s.startswith("myosegmentum") for s in held_out) and any(s.startswith("zukic") for s in held_out)
    assert not held_out & set(card.training["subjects_trained"])
    assert set(SUBJECTS) <= held_out


def test_muscle_model_selection_is_unaffected():
    assert load_model(DEFAULT_MODEL).kind == KIND_MUSCLES
    with pytest.raises(CardError, match="segments vertebrae, not muscles"):
        load_model(DEFAULT_LEVEL_MODEL)  # named as the muscle model: refused, never run
    scan = scan_models()
    kinds = {c.name: c.kind for c in scan.cards}
    assert kinds[DEFAULT_MODEL] == KIND_MUSCLES and kinds[DEFAULT_LEVEL_MODEL] == KIND_VERTEBRAE
    assert not scan.problems


def test_card_round_trip_and_kind_checks(tmp_path):
    card = load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE, verify=False)
    data = card.to_dict()
    assert data["kind"] == "vertebrae" and data["labels"]["5"] == {"vertebra": "L3"}
    again = ModelCard.from_dict(data, card.path)
    assert again.labels == card.labels
    wrong = dict(data, kind="muscles")
    with pytest.raises(CardError):
        ModelCard.from_dict(wrong)
    muscle = load_model(DEFAULT_MODEL, verify=False).to_dict()
    assert ModelCard.from_dict({k: v for k, v in muscle.items() if k != "kind"}).kind == KIND_MUSCLES


def test_models_list_shows_kinds(capsys):
    from node.cli import main

    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name[DEFAULT_LEVEL_MODEL]["kind"] == "vertebrae" and not by_name[DEFAULT_LEVEL_MODEL]["default"]
    assert by_name[DEFAULT_MODEL]["kind"] == "muscles" and by_name[DEFAULT_MODEL]["default"]
    assert by_name[DEFAULT_LEVEL_MODEL]["labels"] == "bodies T11-L5"


# ---------------------------------------------------------------------------------------------
# Pure geometry


def _body(name: str, z_top: float, height: float = 30.0, tilt_deg: float = 0.0) -> Body:
    """A body on the axis x = 0, y = 0: end plates perpendicular to a normal tilted about x."""
    a = math.radians(tilt_deg)
    normal = np.array([0.0, -math.sin(a), math.cos(a)])
    top = np.array([0.0, 0.0, z_top])
    bottom = top - height * normal
    return Body(Vertebra(name), (top + bottom) / 2, top, bottom, normal, normal, 30.0, 1.0)


def _reference(bodies, frame_of_reference="1.2.3") -> LevelReference:
    return LevelReference("1.2.3.1", frame_of_reference, "sag", tuple(bodies), disc_mm=10.0)


def _axial(z: float, tilt_deg: float = 0.0, size: int = 64, centre_y: float = 0.0) -> FrameGeometry:
    a = math.radians(tilt_deg)
    row, col = np.array([1.0, 0, 0]), np.array([0.0, math.cos(a), math.sin(a)])
    centre = np.array([0.0, centre_y, z])
    origin = centre - (size - 1) / 2 * (row + col)
    return FrameGeometry(tuple(origin), tuple(row), tuple(col), (1.0, 1.0), size, size)


def test_level_of_bodies_discs_and_outside():
    # L3 from z 0 to -30, disc to -40, L4 to -70, disc to -80, L5 to -110, then L5-S1 10 mm.
    reference = _reference([_body("L3", 0.0), _body("L4", -40.0), _body("L5", -80.0)])
    assign = level_of(reference)
    assert assign(_axial(-15)) == "L3"
    assert assign(_axial(-35)) == "L3-L4"
    assert assign(_axial(-55)) == "L4"
    assert assign(_axial(-75)) == "L4-L5"
    assert assign(_axial(-100)) == "L5"
    assert assign(_axial(-115)) == "L5-S1"
    assert assign(_axial(-125)) is None  # below the derived L5-S1 disc
    assert assign(_axial(5)) is None  # above the highest body found
    # A tilted plane through the axis at the height of L4's middle is still L4.
    assert assign(_axial(-55, tilt_deg=20)) == "L4"
    # The axis outside the frame's pixels: no level.
    assert assign(_axial(-55, centre_y=200.0)) is None


def test_level_of_follows_tilted_end_plates():
    # L4-L5 disc wedge: L4's inferior end plate tilted 15 degrees; a slab parallel to it.
    upper, lower = _body("L4", 0.0, tilt_deg=15), _body("L5", -40.0)
    assign = level_of(_reference([upper, lower]))
    mid_disc = (upper.inferior + lower.superior) / 2
    assert assign(_axial(mid_disc[2], tilt_deg=15)) == "L4-L5"


def test_axis_runs_through_the_centroids_not_the_end_plate_centres():
    # Horizontal end plates whose traced centres lie 3 mm posterior of the bodies' centroids (as a
    # segmentation's plate middle may): the level is decided where a plane cuts the line through the
    # centroids (x = 0, y = 0), the axis the labels' truth uses too.
    n = np.array([0.0, 0.0, 1.0])

    def body(name, z_top):
        return Body(Vertebra(name), np.array([0.0, 0.0, z_top - 15.0]), np.array([0.0, 3.0, z_top]),
                    np.array([0.0, 3.0, z_top - 30.0]), n, n, 30.0, 1.0)

    reference = _reference([body("L3", 0.0), body("L4", -40.0)])
    axis = spine_axis(reference)
    assert np.allclose(axis[0][1], [0.0, 0.0, -30.0]) and np.allclose(axis[1][0], [0.0, 0.0, -40.0])
    # 0.5 mm below L3's inferior end plate on the axis, tilted 20 degrees: at y = 3 mm the plane is
    # 1.1 mm higher, inside L3; on the axis it is in the disc.
    assert level_of(reference)(_axial(-30.5, tilt_deg=20)) == "L3-L4"
    assert level_of(reference)(_axial(-29.5, tilt_deg=20)) == "L3"


def test_end_plates_crossing_on_the_axis_leave_no_negative_disc():
    n = np.array([0.0, 0.0, 1.0])
    upper = Body(Vertebra.L3, np.array([0.0, 0.0, -15.0]), np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, -33.0]),
                 n, n, 30.0, 1.0)
    lower = Body(Vertebra.L4, np.array([0.0, 0.0, -45.0]), np.array([0.0, 0.0, -31.0]), np.array([0.0, 0.0, -60.0]),
                 n, n, 30.0, 1.0)
    axis = spine_axis(_reference([upper, lower]))
    assert np.allclose(axis[0][1], [0.0, 0.0, -32.0]) and np.allclose(axis[1][0], [0.0, 0.0, -32.0])


def test_end_plate_offsets_per_vertebra_from_the_card():
    card = load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE, verify=False)
    post = card.postprocess
    assert end_plate_offsets(card, "L5") == tuple(post["end_plate_offset_mm_by_vertebra"]["L5"])
    # Measured on training subjects: the model's lower lumbar bodies reach further into the disc below.
    assert end_plate_offsets(card, "L5")[1] > end_plate_offsets(card, "L1")[1]
    assert set(post["calibration"]["subjects"]) <= set(card.training["subjects_trained"])
    plain = ModelCard.from_dict({**card.to_dict(), "postprocess": {"end_plate_offset_mm": [0.5, 1.0]}}, card.path)
    assert end_plate_offsets(plain, "L3") == (0.5, 1.0)
    bare = ModelCard.from_dict({**card.to_dict(), "postprocess": {}}, card.path)
    assert end_plate_offsets(bare, "L3") == (0.0, 0.0)


def test_series_levels_carry_the_reference_problems():
    from inference.vertebrae import SeriesLevels

    reference = _reference([_body("L3", 0.0), _body("L4", -40.0)])
    reference = LevelReference(**{**reference.__dict__, "problems": ("gap between L4 and L5",)})
    levels = SeriesLevels("1.2.3", ("L3", None), None, reference, (0.0, None))
    assert levels.problems == ("gap between L4 and L5",)
    assert levels.as_dict()["problems"] == ["gap between L4 and L5"]
    # No level given (another frame of reference, say): the reason is what counts, not the problems.
    unused = SeriesLevels("1.2.3", (None, None), "another frame of reference", reference)
    assert unused.problems == () and unused.as_dict()["problems"] == []


def test_gap_gives_no_level_between():
    assign = level_of(_reference([_body("L2", 0.0), _body("L4", -80.0)]))
    assert assign(_axial(-15)) == "L2"
    assert assign(_axial(-55)) is None  # L3 was not found: no level rather than a wrong one
    assert assign(_axial(-95)) == "L4"


def test_plane_crossing():
    points = np.array([[0, 0, 10.0], [0, 0, 0.0], [0, 0, -10.0]])
    assert plane_crossing(points, np.array([0, 0, 5.0]), np.array([0, 0, 1.0])) == [(0, 0.5)]
    assert plane_crossing(points, np.array([0, 0, 50.0]), np.array([0, 0, 1.0])) == []


def test_naming_by_consensus_fixes_one_wrong_vote():
    votes = [np.eye(8)[k] * 100 for k in (3, 4, 4, 6, 7)]  # the 3rd body voted L2 but lies between L2 and L4
    names, problems = name_candidates(votes, "consensus")
    assert names == [3, 4, 5, 6, 7]
    # The problem names the body, and what the model called it.
    assert problems == ["1 of 5 bodies was named by their order: the model's own name for it differed: "
                        "L3 (the model: L2)"], problems
    # A body above T11 cannot be named: one body, said so, and not also as "named by its order".
    _, above = name_candidates([np.eye(8)[k] * 100 for k in (1, 1, 2, 3)], "consensus")
    assert "1 body outside T11-L5 was not named" in above, above
    assert not any("unnamed" in problem for problem in above), above
    direct, direct_problems = name_candidates(votes, "direct")
    assert direct.count(4) == 1 and None in direct and direct_problems
    order, _ = name_candidates([np.eye(8)[1] * 10] * 3, "order")
    assert order == [5, 6, 7]  # the lowest is L5


def test_series_in_another_frame_of_reference_gets_no_levels():
    from inference.training.vertebrae_eval import series_of

    reference = _reference([_body("L3", 0.0)], frame_of_reference="1.2.3")
    series = series_of([_axial(-15)], None, "1.2.9", "1.2.4", "ax")
    result = assign_levels(reference, series)
    assert result.levels == (None,) and "frame of reference" in result.reason
    same = assign_levels(reference, series_of([_axial(-15)], None, "1.2.9", "1.2.3", "ax"))
    assert same.levels == ("L3",) and same.reason is None


# ---------------------------------------------------------------------------------------------
# Real data: DICOM studies from held-out subjects


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    files = [f for s in SUBJECTS for f in vertebrae_files(s)]
    require_data(files)
    out = {}
    for subject in SUBJECTS:
        out[subject] = write_vertebrae_study(tmp_path_factory.mktemp(subject), subject, seed=f"levels/{subject}")
    return out


@pytest.fixture(scope="module")
def level_card():
    return load_model(DEFAULT_LEVEL_MODEL, kind=KIND_VERTEBRAE)


def _levels_of_study(study, card):
    reference = find_bodies(read_series(study.series["sagittal"].files), card)
    out = {}
    for role, info in study.series.items():
        if role.startswith("axial"):
            series = read_series(info.files)
            out[role] = (series, assign_levels(reference, series))
    return reference, out


def test_axial_levels_on_held_out_subjects(studies, level_card):
    from inference.training.vertebrae_eval import true_level

    right = total = 0
    per_geometry: dict[str, list[int]] = {}
    errors = []
    for subject, (study, volume) in studies.items():
        reference, levels = _levels_of_study(study, level_card)
        assert reference.bodies, f"{subject}: {reference.problems}"
        assert reference.names[-1] == "L5", f"{subject}: lowest body {reference.names[-1]}"
        for role, (series, result) in levels.items():
            assert result.reason is None
            for frame, level in zip(series.geometry, result.levels):
                truth, known = true_level(volume, frame)
                if not known:
                    continue
                total += 1
                right += level == truth
                counts = per_geometry.setdefault(role, [0, 0])
                counts[0] += level == truth
                counts[1] += 1
                if level != truth:
                    errors.append(f"{subject} {role}: {level} for {truth}")
    accuracy = right / total
    print(f"axial slices at the right level: {right}/{total} = {accuracy:.3f}; {per_geometry}; errors {errors}")
    assert total > 150
    assert accuracy >= MIN_LEVEL_ACCURACY, errors
    # Every wrong level is at most the neighbouring half-level (a body for its disc or back).
    for error in errors:
        predicted, truth = error.split(": ")[1].split(" for ")
        assert predicted != "None" and abs(Level.parse(predicted).order - Level.parse(truth).order) <= 0.5, error


def test_bodies_have_end_plates_in_order(studies, level_card):
    study, volume = studies["zukic-10"]
    reference = find_bodies(read_series(study.series["sagittal"].files), level_card)
    truth = volume.bodies()
    for body in reference.bodies:
        assert body.superior[2] > body.centroid[2] > body.inferior[2]
        assert abs(np.linalg.norm(body.superior_normal) - 1) < 1e-6 and body.superior_normal[2] > 0.7
        if body.vertebra in truth:
            assert np.linalg.norm(body.centroid - truth[body.vertebra]) < 12.0, body.name
    z = [b.centroid[2] for b in reference.bodies]
    assert z == sorted(z, reverse=True)
    assert 5.0 <= reference.disc_mm <= 15.0


def test_end_plates_where_slices_cross_the_axis(studies, level_card):
    """The found bodies end where the labelled ones do, within about a millimetre, where planes
    (straight and tilted) cross the spine's axis: no systematic bias left on held-out subjects."""
    from inference.training.vertebrae_eval import boundary_errors

    errors = []
    for subject in ("myosegmentum-07", "zukic-10"):
        study, volume = studies[subject]
        errors += boundary_errors(volume, find_bodies(read_series(study.series["sagittal"].files), level_card),
                                  step=0.5)
    print({side: [round(e[3], 1) for e in errors if e[1] == side] for side in ("superior", "inferior")})
    for side in ("superior", "inferior"):
        values = [e[3] for e in errors if e[1] == side]
        assert len(values) >= 20, side
        assert abs(float(np.median(values))) <= 1.0, (side, values)
    assert max(abs(e[3]) for e in errors) <= 4.0


def test_sagittal_in_another_frame_of_reference(tmp_path, level_card, capsys):
    files = vertebrae_files("zukic-10")
    require_data(files)
    study, _ = write_vertebrae_study(tmp_path, "zukic-10", seed="levels/other-for", axial=("straight",),
                                     sagittal_frame_of_reference="1.2.826.0.1.3680043.8.498.1")
    reference, levels = _levels_of_study(study, level_card)
    series, result = levels["axial_straight"]
    assert all(level is None for level in result.levels)
    assert "frame of reference" in result.reason
    from node.cli import main

    assert main(["levels", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no levels" in out and "frame of reference" in out


def test_cli_json_equals_the_python_levels(studies, level_card, capsys):
    from node.cli import main

    study, _ = studies["myosegmentum-07"]
    reference, levels = _levels_of_study(study, level_card)
    expected = {}
    for series, result in levels.values():
        for frame, level in zip(series.geometry, result.levels):
            expected[(series.series_instance_uid, frame.sop_instance_uid)] = level
    assert main(["levels", str(study.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = {(r["series_instance_uid"], r["sop_instance_uid"]): r["level"] for r in rows}
    assert got == expected
    assert all(r["reference_series_instance_uid"] == study.series["sagittal"].series_uid for r in rows)
    assert all(r["bodies_found"] == list(reference.names) and r["reference_problems"] == list(reference.problems)
               for r in rows)
    assert rows[0]["bodies_found"][-1] == "L5"
    assert main(["levels", str(study.root)]) == 0
    text = capsys.readouterr().out
    assert "reference: sagittal series" in text and "(T2)" in text and "bodies found: " in text


def test_cli_on_a_folder_without_images_exits_1_with_or_without_json(tmp_path, capsys):
    from node.cli import main

    assert main(["levels", str(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "no DICOM images found" in captured.err
    assert main(["levels", str(tmp_path)]) == 1
    assert "no DICOM images found" in capsys.readouterr().out


def test_cli_without_sagittal_says_why(tmp_path, capsys):
    files = vertebrae_files("myosegmentum-07")
    require_data(files)
    write_vertebrae_study(tmp_path, "myosegmentum-07", seed="levels/no-sag", axial=("straight",), sagittal=False)
    from node.cli import main

    assert main(["levels", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["level"] is None and "no sagittal series" in r["reason"] for r in rows)
    assert main(["levels", str(tmp_path)]) == 0
    assert "no levels: no sagittal series" in capsys.readouterr().out


def test_reference_prefers_sagittal_t2_then_t1():
    from node.levels import _Series, choose_reference
    from node.orchestration.rules import SeriesHeaders

    def series(uid, orientation, tr, te, description, count=15):
        header = {"frames": [{"orientation": orientation}], "RepetitionTime": tr, "EchoTime": te,
                  "SeriesDescription": description}
        return _Series(SeriesHeaders(uid, "1", 1, (header,) * count), [f"{uid}.{i}" for i in range(count)])

    sagittal, axial = [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 1, 0]
    t1 = series("t1", sagittal, 600, 10, "t1_tse_sag")
    t2 = series("t2", sagittal, 3500, 95, "t2_tse_sag")
    stir = series("stir", sagittal, 4000, 40, "stir_sag")
    tra = series("tra", axial, 3500, 95, "t2_tse_tra")
    assert choose_reference([t1, stir, t2, tra])[:2] == (t2, "t2")
    assert choose_reference([stir, t1, tra])[:2] == (t1, "t1")
    assert choose_reference([stir, tra])[0] is stir
    none, _, reason = choose_reference([tra])
    assert none is None and "no sagittal series" in reason


def test_disc_key_frame_is_the_frame_nearest_the_middle_of_the_disc():
    # L3 from z 0 to -30, L3-L4 disc from -30 to -40 (middle -35), L4 from -40 to -70.
    reference = _reference([_body("L3", 0.0), _body("L4", -40.0)])
    locate = axis_position(reference)
    assert locate(_axial(-31.0)) == ("L3-L4", pytest.approx(4.0))
    assert locate(_axial(-55.0)) == ("L4", pytest.approx(0.0))
    assert locate(_axial(5.0)) == (None, None)
    heights = [-29.0, -31.0, -34.0, -37.5, -39.5, -55.0]
    found = [locate(_axial(z)) for z in heights]
    levels, offsets = [f[0] for f in found], [f[1] for f in found]
    assert disc_key_frames(levels, offsets) == {"L3-L4": 2}  # -34 is 1 mm from the middle
    # Quality control set that frame aside: the next nearest that passed (-37.5, 2.5 mm) is the key slice.
    assert disc_key_frames(levels, offsets, excluded={2}) == {"L3-L4": 3}
    assert disc_key_frames(levels, offsets, excluded={1, 2, 3, 4}) == {}
