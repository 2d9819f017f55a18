"""Ten senders at once, and a corrupt instance inside a series: nothing good is lost."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread

from tests import studies
from tests.dicomfiles import dataset_bytes
from tests.peers import dcmtk_env, require_tool
from tests.test_receive import _raw_store


def test_ten_senders_at_once(node, tmp_path: Path) -> None:
    studies.require_data()
    copies = studies.write_copies(tmp_path / "send", n_series=10, series_per_study=1)
    senders = [
        subprocess.Popen(
            [require_tool("storescu"), "-aet", f"SENDER{number}", "-aec", node.ae_title, "127.0.0.1",
             str(node.port), *map(str, study.files)],
            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for number, study in enumerate(copies)
    ]
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    assert all(sender.returncode == 0 for sender in senders), outputs
    assert not any("Failed" in output for output in outputs), outputs
    total = sum(len(study.files) for study in copies)
    status = node.wait_for(
        lambda s: s["counts"]["instances"] == total and len(s["series"]) == 10
        and all(x["state"] == "ready" for x in s["series"]),
        timeout=120, what="every instance of ten senders stored and every series ready",
    )
    assert {a["calling_ae"] for a in status["associations"]} == {f"SENDER{n}" for n in range(10)}
    assert all(a["failures"] == 0 and a["instances"] == 29 for a in status["associations"])
    for study in copies:
        for path in study.files[:3]:
            sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            stored = list(node.data.glob(f"studies/*/*/{sop}.dcm"))
            assert len(stored) == 1 and dcmread(stored[0]).PixelData == dcmread(path).PixelData


def test_corrupt_instance_inside_a_series(node, tmp_path: Path) -> None:
    studies.require_data()
    study = studies.write_dixon_study(tmp_path / "study", contrasts=("water",))
    files = study.files
    corrupt = files[10]
    ds = dcmread(corrupt, stop_before_pixels=True)
    good = files[:10] + files[11:]
    first = node.storescu(good[:10])
    response = _raw_store(node.port, tmp_path, dataset_bytes(corrupt)[:-5000], str(ds.SOPClassUID),
                          str(ds.SOPInstanceUID))
    second = node.storescu(good[10:])
    assert "Failed" not in first.stderr + second.stderr
    assert response.Status == 0xC210
    status = node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "ready", what="series ready")
    assert status["series"][0]["instances"] == 28
    assert not list(node.data.glob(f"studies/*/*/{ds.SOPInstanceUID}.dcm"))
    # The sender fixes it and sends it again: the series is complete and judged again.
    node.storescu([corrupt])
    status = node.wait_for(lambda s: s["series"][0]["instances"] == 29 and s["series"][0]["state"] == "ready",
                           what="the series complete")
    assert status["series"][0]["version"] == 2
