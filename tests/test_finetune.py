"""Fine-tuning from a site's DICOM SEGs: ``musclenode models train --from-seg``, on real data.

The real TUM01 study is written as DICOM (water and fat series, tests/studies.py) and segmented
with its manual labels into a SEG by the node's own SEG writer (reports/seg.py), as a reader's
corrected SEG would come back. The fine-tuning run is short (one epoch of two steps, one thread):
it checks that the command runs end to end and writes an honest card, not that it learns.
Tests that need ../shared/data skip without it, and fail under CI=true (tests/studies.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("onnxruntime")

from inference.card import LabelInfo  # noqa: E402
from inference.registry import default_model_name, load_model, scan_models  # noqa: E402
from inference.runtime import Segmenter  # noqa: E402
from inference.training.data import Case, SliceLayout  # noqa: E402
from inference.training.finetune import (  # noqa: E402
    FinetuneError,
    SegCase,
    finetune,
    map_segments,
    network_from_onnx,
    next_version,
    patient_key,
    split_cases,
)
from node.cli import main  # noqa: E402
from reports.seg import build_segmentation  # noqa: E402
from tests.test_seg import CARD, SOFTWARE, Tum01, write_tum01  # noqa: E402

LABELS = {1: LabelInfo("erector_spinae", "right"), 2: LabelInfo("multifidus", "right"),
          3: LabelInfo("multifidus", "left"), 4: LabelInfo("erector_spinae", "left")}
BASE = default_model_name()
TRAIN = ["--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2", "--threads", "1",
         "--holdout-fraction", "0.1"]


@dataclass
class Trained:
    tum01: Tum01
    seg_path: Path
    models: Path
    output: str


@pytest.fixture(scope="module")
def tum01(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tum01, Path]:
    """TUM01's water and fat series and a SEG of the water series from the manual labels."""
    tum01 = write_tum01(tmp_path_factory.mktemp("tum01"))
    seg = build_segmentation(tum01.label_map, *CARD, tum01.identity(), SOFTWARE)
    path = tum01.folder / "corrected-seg.dcm"
    seg.save_as(path)
    return tum01, path


@pytest.fixture(scope="module")
def trained(tum01, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    study, seg_path = tum01
    models = tmp_path_factory.mktemp("site-models")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["models", "train", "--from-seg", str(study.folder), "--out", str(models), *TRAIN])
    assert status == 0, buffer.getvalue()
    return Trained(study, seg_path, models, buffer.getvalue())


def _card(trained: Trained):
    return load_model(f"{BASE}@2.0.0+site.1", [trained.models])


# ---------------------------------------------------------------------------------------------
# The new model and its card
# ---------------------------------------------------------------------------------------------


def test_new_version_and_provenance(trained: Trained) -> None:
    card = _card(trained)
    base = load_model(f"{BASE}@2.0.0")
    assert card.name == BASE and card.version == "2.0.0+site.1"
    assert card.path.parent == trained.models.resolve() and card.path.name == f"{BASE}-2.0.0+site.1.json"
    assert sorted(p.name for p in trained.models.iterdir()) == [f"{BASE}-2.0.0+site.1.json", f"{BASE}-2.0.0+site.1.onnx"]
    # The layout, labels and windows are the base model's.
    for attribute in ("labels", "output_labels", "contrasts", "array_axes", "spacing_mm", "window", "overlap"):
        assert getattr(card, attribute) == getattr(base, attribute), attribute
    provenance = card.provenance
    assert provenance["base_model"] == {"name": BASE, "version": "2.0.0", "sha256": base.sha256}
    data = provenance["data"]
    water, fat = trained.tum01.water, trained.tum01.fat
    assert data["seg_instances"] == 1 and data["source_series"] == 1 and data["patients"] == 1
    assert data["seg_uids"] == [str(pydicom.dcmread(trained.seg_path, stop_before_pixels=True).SOPInstanceUID)]
    # The fat series of the same acquisition joined the water series the SEG references.
    assert data["series_uids"] == sorted([water.series_instance_uid, fat.series_instance_uid])
    assert data["frames"] == len(water) == 29
    patient_id = str(pydicom.dcmread(water.source_paths[water.geometry[0].sop_instance_uid]).PatientID)
    assert data["patient_keys"] == [patient_key(patient_id)] and patient_id not in json.dumps(card.to_dict())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", provenance["date"])
    assert provenance["software"]["musclenode"] == SOFTWARE and provenance["software"]["torch"]
    assert "largest difference ONNX Runtime vs torch" in provenance["fine_tuned_from"]
    training = card.training
    assert training["command"].startswith("musclenode ") and training["steps"] == 2
    assert training["network"]["channels"] == [16, 32, 64, 128, 256]
    assert training["onnx_vs_torch_max_abs_difference"] < 1e-3


def test_held_out_dice_is_measured_on_held_out_slices_only(trained: Trained) -> None:
    card = _card(trained)
    split = card.training["split"]
    assert split["by"] == "slices" and "NOT across patients" in split["note"]
    (held,) = split["held_out"].values()
    # 10 % of 29 labelled slices: a contiguous block of 3 in the middle.
    assert held == [13, 14, 15]
    assert card.training["slices_trained"] == 29 - len(held)
    accuracy = card.accuracy
    assert accuracy["split"] == "slices" and accuracy["held_out_slices"] == 3
    assert set(accuracy["dice"]) == {"water", "fat", "in_phase"}
    for key in ("dice", "base_model_dice"):
        for contrast, groups in accuracy[key].items():
            scores = groups["held_out_slices"]
            assert set(scores) == {"1", "2", "3", "4"}
            assert all(0.0 < d <= 1.0 for d in scores.values()), (key, contrast, scores)
    # Two steps at a small learning rate leave the base model nearly as it was.
    for contrast in accuracy["dice"]:
        new = accuracy["dice"][contrast]["held_out_slices"]
        old = accuracy["base_model_dice"][contrast]["held_out_slices"]
        assert all(abs(new[v] - old[v]) < 0.05 for v in new)

    # Independently: the node's own runtime on the held-out frames of the water series, against
    # the manual labels, gives the card's water Dice (the runtime crops and blends a little
    # differently from the training evaluation, hence the tolerance).
    tum01 = trained.tum01
    segmenter = Segmenter(card, providers="cpu", threads=1)
    labels = segmenter.segment(tum01.water.select(held)).labels
    truth = [tum01.label_map.labels[i] for i in held]
    for value, reported in accuracy["dice"]["water"]["held_out_slices"].items():
        p = np.stack(labels) == int(value)
        t = np.stack(truth) == int(value)
        measured = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert abs(measured - reported) < 0.03, (value, measured, reported)
    print(f"held-out Dice (water) {accuracy['dice']['water']['held_out_slices']}, "
          f"base {accuracy['base_model_dice']['water']['held_out_slices']}")


def test_registry_lists_and_selects_the_new_version(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    scan = scan_models([trained.models])
    versions = [(c.name, c.version) for c in scan.versions if c.name == BASE]
    assert versions == [(BASE, "1.0.0"), (BASE, "2.0.0"), (BASE, "2.0.0+site.1")]
    # A fine-tuned (local) version is used only when chosen: the plain name keeps the release
    # version; NAME@VERSION selects either.
    assert load_model(BASE, [trained.models]).version == "2.0.0"
    assert load_model(f"{BASE}@2.0.0+site.1", [trained.models]).version == "2.0.0+site.1"
    assert load_model(f"{BASE}@1.0.0", [trained.models]).path.parent == load_model(BASE).path.parent
    with pytest.raises(LookupError, match=r"no version '9\.9' of model .*versions: 1\.0\.0, 2\.0\.0, 2\.0\.0\+site\.1"):
        load_model(f"{BASE}@9.9", [trained.models])
    assert next_version(load_model(BASE), scan.versions) == "2.0.0+site.2"

    assert main(["models", "list", "--dir", str(trained.models), "--json"]) == 0
    listed = {m["version"]: m for m in json.loads(capsys.readouterr().out) if m["name"] == BASE}
    assert listed["2.0.0"]["selected_by_name"] and not listed["1.0.0"]["selected_by_name"] and not listed["2.0.0+site.1"]["selected_by_name"]
    assert listed["2.0.0+site.1"]["select"] == f"{BASE}@2.0.0+site.1"
    assert listed["2.0.0+site.1"]["accuracy"].startswith("Dice water 0.9")
    assert main(["models", "list", "--dir", str(trained.models)]) == 0
    out = capsys.readouterr().out
    assert f"(select as {BASE}@2.0.0+site.1)" in out
    assert f'model.name = "{BASE}@2.0.0+site.1"' in trained.output


def test_the_pipeline_runs_the_new_model_on_the_series(trained: Trained, tmp_path: Path) -> None:
    """``musclenode process`` with model.name NAME@VERSION: the SEG it writes names the new version."""
    config = tmp_path / "musclenode.toml"
    config.write_text(f'[model]\nname = "{BASE}@2.0.0+site.1"\ndirs = ["{trained.models}"]\n')
    out = tmp_path / "out"
    status = main(["--config", str(config), "process", str(trained.tum01.folder), "--out", str(out),
                   "--workers", "0", "--threads", "1"])
    assert status == 0
    segs = [p for p in out.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    assert segs
    seg = pydicom.dcmread(segs[0], stop_before_pixels=True)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "2.0.0+site.1"


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def _copy_study(tum01: Tum01, folder: Path, with_sources: bool = True) -> Path:
    folder.mkdir()
    if with_sources:
        for path in tum01.source_files:
            shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    return folder


def _train(tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["models", "train", "--from-seg", str(folder), "--out", str(tmp_path / "models"), *TRAIN])
    return status, capsys.readouterr().err


def test_a_segment_that_cannot_be_mapped_is_refused(tum01, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, seg_path = tum01
    folder = _copy_study(study, tmp_path / "study")
    seg = pydicom.dcmread(seg_path)
    kind = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning = "78961009", "SCT", "Spleen"
    del seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    seg.save_as(folder / "seg.dcm")
    status, err = _train(tmp_path, folder, capsys)
    assert status == 1
    assert ("cannot map segment 2 'right multifidus': property type Spleen (78961009/SCT), anatomic region "
            "Lumbar spine" in err) and "has no muscle of musclenode's vocabulary" in err
    assert "segment 3 'left erector spinae': property type Erector spinae muscle (44947003/SCT)" in err
    assert "has no laterality (Left or Right) of musclenode's vocabulary" in err
    assert "the model's labels: 1 right erector spinae" in err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_muscle_the_model_does_not_know_is_refused() -> None:
    seg = Dataset()
    seg.SegmentSequence = [_segment(1, "6001004", "Quadratus lumborum muscle", "7771000", in_region=False)]
    with pytest.raises(FinetuneError, match="segment 1 .*left quadratus lumborum, which the model has no label for"):
        map_segments(seg, LABELS, "SEG x")


def test_segments_coded_by_anatomic_region_map_as_3d_slicer_writes_them() -> None:
    """Property type "Muscle", the muscle and its side in the anatomic region (and the old SRT)."""
    seg = Dataset()
    seg.SegmentSequence = [_segment(1, "44947003", "Erector spinae muscle", "7771000", in_region=True),
                           _segment(2, "5709001", "Multifidus muscles", "24028007", in_region=True, scheme="SRT")]
    assert map_segments(seg, LABELS) == {1: 4, 2: 2}
    seg.SegmentSequence.append(_segment(3, "44947003", "Erector spinae muscle", "7771000", in_region=False))
    with pytest.raises(FinetuneError, match="a second segment of the left erector spinae"):
        map_segments(seg, LABELS)


def _segment(number: int, value: str, meaning: str, side: str, in_region: bool, scheme: str = "SCT") -> Dataset:
    def code(v: str, s: str, m: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = v, s, m
        return item

    laterality = code(side, scheme, "Left" if side == "7771000" else "Right")
    item = Dataset()
    item.SegmentNumber, item.SegmentLabel = number, meaning
    if in_region:
        kind = code("71616004", "SCT", "Muscle")  # a generic property type
        region = code(value, scheme, meaning)
        region.AnatomicRegionModifierSequence = [laterality]
        item.AnatomicRegionSequence = [region]
    else:
        kind = code(value, scheme, meaning)
        kind.SegmentedPropertyTypeModifierCodeSequence = [laterality]
    item.SegmentedPropertyTypeCodeSequence = [kind]
    return item


def test_missing_source_images_are_refused(tum01, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, seg_path = tum01
    folder = _copy_study(study, tmp_path / "study", with_sources=False)
    shutil.copy(seg_path, folder / "seg.dcm")
    water = study.water
    keep = [water.source_paths[g.sop_instance_uid] for g in water.geometry[:20]]
    for path in keep:
        shutil.copy(path, folder / path.name)
    status, err = _train(tmp_path, folder, capsys)
    assert status == 1
    missing = water.geometry[20].sop_instance_uid
    assert f"9 of its 29 source images (series {water.series_instance_uid}) are not in the given paths" in err
    assert f"first missing SOP Instance UID {missing}" in err and "Put the source series beside the SEG" in err

    empty = tmp_path / "nothing"
    empty.mkdir()
    status, err = _train(tmp_path, empty, capsys)
    assert status == 1 and "no DICOM SEG among 0 DICOM files" in err


def test_segments_on_the_wrong_side_are_refused(tum01, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, seg_path = tum01
    folder = _copy_study(study, tmp_path / "study")
    seg = pydicom.dcmread(seg_path)
    for item in seg.SegmentSequence:
        modifier = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        modifier.CodeValue = "24028007" if modifier.CodeValue == "7771000" else "7771000"
    seg.save_as(folder / "seg.dcm")
    status, err = _train(tmp_path, folder, capsys)
    assert status == 1 and "lies on the patient's" in err and "its segments name the wrong side" in err


# ---------------------------------------------------------------------------------------------
# Split and weights, without training
# ---------------------------------------------------------------------------------------------


def _fake_case(name: str, patient: str, slices: int = 10) -> SegCase:
    labels = np.zeros((8, 8, slices), np.int16)
    labels[2:4, 2:4, :] = 1
    affine = np.diag([-1.0, -1.0, 4.0, 1.0])
    case = Case(name, {"water": np.ones((8, 8, slices), np.float32)}, labels, affine,
                SliceLayout.from_affine(affine))
    return SegCase(case, patient, f"seg-{name}", f"series-{name}", "study", {"water": f"series-{name}"}, slices)


def test_split_holds_out_whole_patients() -> None:
    cases = [_fake_case("a1", "A"), _fake_case("a2", "A"), _fake_case("b", "B"), _fake_case("c", "C"),
             _fake_case("d", "D"), _fake_case("e", "E")]
    split = split_cases(cases, fraction=0.2, seed=3)
    assert split.by == "patient" and "across patients" in split.note
    held_patients = {cases[n].patient_id for n in split.held_out}
    assert len(held_patients) == 1  # 20 % of 5 patients
    # All of a held-out patient's series and slices, none of anyone else's.
    assert set(split.held_out) == {n for n, c in enumerate(cases) if c.patient_id in held_patients}
    assert all(slices == list(range(10)) for slices in split.held_out.values())
    assert set(split.patients_held_out).isdisjoint(split.patients_trained)
    assert len(split.patients_trained) == 4
    assert split_cases(cases, fraction=0.2, seed=3) == split

    single = split_cases([_fake_case("x", "X", slices=29)], fraction=0.2)
    assert single.by == "slices" and single.held_out == {0: [11, 12, 13, 14, 15, 16]}
    assert "NOT across patients" in single.note
    with pytest.raises(FinetuneError, match="at least 2"):
        split_cases([_fake_case("y", "Y", slices=1)])


def test_an_existing_or_malformed_version_is_refused(tmp_path: Path) -> None:
    base = load_model(BASE)
    with pytest.raises(FinetuneError, match=r"model musclenode-lumbar-dixon 2\.0\.0 exists already"):
        finetune(base, [tmp_path], tmp_path, lambda series, header: "water", version="2.0.0")
    with pytest.raises(FinetuneError, match="use letters, digits"):
        finetune(base, [tmp_path], tmp_path, lambda series, header: "water", version="1.0 site")


def test_onnx_weights_map_exactly_onto_the_cards_network() -> None:
    network, config, difference = network_from_onnx(load_model(BASE))
    assert config.channels == (16, 32, 64, 128, 256) and config.classes == 5
    assert difference < 1e-4
    assert sum(p.numel() for p in network.parameters()) == load_model(BASE).training["network"]["parameters"]

