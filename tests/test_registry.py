"""The model registry and the ``musclenode models`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.card import CardError, LabelInfo, ModelCard, file_sha256
from inference.registry import (
    ModelNotFound,
    accuracy_summary,
    bundled_dir,
    default_model_name,
    list_models,
    load_model,
    scan_models,
)
from node.cli import main

LABELS = {1: LabelInfo("erector_spinae", "right"), 2: LabelInfo("multifidus", "right"),
          3: LabelInfo("multifidus", "left"), 4: LabelInfo("erector_spinae", "left")}
ACCURACY = {"metric": "Dice", "dice": {
    "water": {"holdout": {"1": 0.8, "2": 0.9}, "all": {"1": 0.9, "2": 0.9, "3": 0.8, "4": 0.8}},
    "fat": {"holdout": {"1": 0.7, "2": 0.8}}}}


def write_model(folder: Path, name: str, version: str = "1.0", payload: bytes = b"onnx bytes",
                **overrides) -> ModelCard:
    """A card and a stand-in model file (the registry never runs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / f"{name}-{version}.onnx"
    onnx_path.write_bytes(payload)
    values = dict(name=name, version=version, onnx=onnx_path.name, sha256=file_sha256(onnx_path),
                  labels=LABELS, output_labels=[1, 2, 3, 4], contrasts=["water", "fat"], channels=1,
                  array_axes=["P", "L"], spacing_mm=[1.0, 1.0], normalisation={"method": "zscore_nonzero"},
                  window=[128, 128], overlap=0.5, licence="Apache-2.0", accuracy=ACCURACY,
                  provenance={"trained_on": "MyoSegmenTUM TUM01"})
    values.update(overrides)
    card = ModelCard(**values)
    card.save(folder / f"{name}-{version}.json")
    return card


def test_default_model_name_and_bundled_folder() -> None:
    assert default_model_name() == "musclenode-lumbar-dixon"
    assert bundled_dir() == Path(__file__).resolve().parents[1] / "inference" / "models"


def test_scan_finds_cards_in_extra_folders_and_reports_problems(tmp_path: Path) -> None:
    site, other = tmp_path / "site", tmp_path / "other"
    write_model(site, "alpha")
    write_model(site, "beta", "2.0")
    write_model(other, "alpha", "9.9")  # shadowed: site comes first
    (site / "broken.json").write_text("{not json")
    (site / "orphan.json").write_text(json.dumps({**json.loads((site / "beta-2.0.json").read_text()),
                                                  "name": "orphan", "onnx": "missing.onnx"}))
    scan = scan_models([site, other, tmp_path / "nowhere"])
    found = {c.name: c for c in scan.cards}
    assert {"alpha", "beta"} <= set(found) and "orphan" not in found
    assert found["alpha"].version == "1.0" and found["alpha"].path.parent == site.resolve()
    problems = "\n".join(scan.problems)
    assert "broken.json" in problems
    assert "its model missing.onnx is missing" in problems
    assert "model alpha is shadowed by" in problems
    assert "nowhere: model folder does not exist" in problems
    assert [c.name for c in list_models([site])] == sorted(c.name for c in list_models([site]))


def test_load_model_by_name_checks_the_model_file(tmp_path: Path) -> None:
    card = write_model(tmp_path, "alpha")
    loaded = load_model("alpha", [tmp_path])
    assert loaded == card and loaded.onnx_path.read_bytes() == b"onnx bytes"
    (tmp_path / "alpha-1.0.onnx").write_bytes(b"tampered")
    with pytest.raises(CardError, match="does not match its card's sha256"):
        load_model("alpha", [tmp_path])
    assert load_model("alpha", [tmp_path], verify=False).name == "alpha"
    with pytest.raises(ModelNotFound, match=r"no model named 'gamma' .*available: .*alpha"):
        load_model("gamma", [tmp_path])


def test_bundled_default_model_loads_when_present() -> None:
    cards = {c.name: c for c in scan_models().cards}
    if default_model_name() not in cards:
        pytest.skip(f"the bundled model {default_model_name()} is not in {bundled_dir()} yet")
    card = load_model(default_model_name())
    assert card.path.parent == bundled_dir()
    assert all(v in card.labels for v in card.output_labels)


def test_accuracy_summary() -> None:
    card = write_model_card_only(accuracy=ACCURACY)
    assert accuracy_summary(card) == "Dice water 0.85, fat 0.75"
    assert accuracy_summary(write_model_card_only(accuracy={"summary": "Dice 0.9 on TUM02"})) == "Dice 0.9 on TUM02"
    assert accuracy_summary(write_model_card_only(accuracy={})) == "not measured"
    assert accuracy_summary(write_model_card_only(accuracy={"dice": {"water": {}}})) == "not measured"
    synthetic = {"dice": {"water": {"all": {"1": 0.9}}, "t2": {"all": {"1": 0.8, "2": 0.9}}},
                 "synthetic_inputs": {"t2": {"seed": 202}}}
    assert accuracy_summary(write_model_card_only(accuracy=synthetic)) == "Dice water 0.90, synthetic t2 0.85"


def write_model_card_only(**overrides) -> ModelCard:
    values = dict(name="x", version="1", onnx="x.onnx", sha256="0", labels=LABELS, output_labels=[1, 2, 3, 4],
                  contrasts=["water"], channels=1, array_axes=["P", "L"], spacing_mm=[1.0, 1.0],
                  normalisation={"method": "zscore_nonzero"}, window=[64, 64], overlap=0.5)
    values.update(overrides)
    return ModelCard(**values)


def test_cli_models_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path, "alpha")
    write_model(tmp_path, default_model_name(), "3.1", payload=b"other")
    assert main(["models", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out.splitlines()}
    assert "alpha" in lines and lines[default_model_name()].startswith("*")
    assert "3.1" in lines[default_model_name()]
    assert "water,fat" in lines["alpha"]
    assert "erector spinae L/R, multifidus L/R" in lines["alpha"]
    assert "Dice water 0.85, fat 0.75" in lines["alpha"]

    assert main(["models", "list", "--dir", str(tmp_path), "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed[default_model_name()]["default"] is True and listed["alpha"]["default"] is False
    assert listed["alpha"]["contrasts"] == ["water", "fat"]


def test_cli_models_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path, "alpha")
    assert main(["models", "show", "alpha", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alpha 1.0\n")
    for expected in ("matches the card", "rows towards P, columns towards L", "1 right erector spinae",
                     "4 left erector spinae", "128 x 128, overlap 0.5, gaussian", "Apache-2.0",
                     '"trained_on": "MyoSegmenTUM TUM01"', "Dice water 0.85, fat 0.75"):
        assert expected in out, expected
    (tmp_path / "alpha-1.0.onnx").write_bytes(b"changed")
    assert main(["models", "show", "alpha", "--dir", str(tmp_path)]) == 0
    assert "DOES NOT MATCH the card" in capsys.readouterr().out

    assert main(["models", "show", "alpha", "--dir", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "alpha" and shown["labels"]["3"] == {"muscle": "multifidus", "side": "left"}

    assert main(["models", "show", "nothing", "--dir", str(tmp_path)]) == 1
    assert "no model named 'nothing'" in capsys.readouterr().err
