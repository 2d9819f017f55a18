"""Cohort pieces without peers: the [[pacs]] settings, the manifest file, the filters, the tables."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydicom.dataset import Dataset

from node.cohort.filters import CohortFilter
from node.cohort.manifest import COLUMNS, ManifestError, ManifestRow, read_manifest, write_manifest
from node.cohort.targets import FolderTarget
from node.config import ConfigError, load_config, to_toml
from node.orchestration.tables import write_table


def _config(tmp_path: Path, text: str):
    path = tmp_path / "musclenode.toml"
    path.write_text(text)
    return load_config(path, environ={})


def test_pacs_settings(tmp_path: Path) -> None:
    config = _config(tmp_path, '[[pacs]]\nname = "main"\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
                               'retrieve = "dicomweb"\ndicomweb = "http://10.0.0.5:8042/dicom-web/"\n')
    (archive,) = config.pacs
    assert (archive.name, archive.ae_title, archive.port, archive.retrieve) == ("main", "PACS", 104, "dicomweb")
    assert archive.dicomweb == "http://10.0.0.5:8042/dicom-web"
    assert load_config(environ={}).pacs == ()
    (tmp_path / "shown.toml").write_text(to_toml(config))
    assert load_config(tmp_path / "shown.toml", environ={}) == config
    with pytest.raises(ConfigError, match=r"pacs: pacs\[1\] \(a\) retrieves by dicomweb but has no dicomweb URL"):
        _config(tmp_path, '[[pacs]]\nname = "a"\nae_title = "PACS"\nhost = "h"\nport = 104\nretrieve = "dicomweb"\n')
    with pytest.raises(ConfigError, match=r"pacs\[1\]\.retrieve: must be move, get or dicomweb, got 'ftp'"):
        _config(tmp_path, '[[pacs]]\nname = "a"\nae_title = "PACS"\nhost = "h"\nport = 104\nretrieve = "ftp"\n')
    with pytest.raises(ConfigError, match="used twice"):
        _config(tmp_path, '[[pacs]]\nname = "a"\nae_title = "P"\nhost = "h"\nport = 1\n'
                          '[[pacs]]\nname = "a"\nae_title = "Q"\nhost = "h"\nport = 2\n')


def test_manifest_round_trip_and_hand_written(tmp_path: Path) -> None:
    rows = [ManifestRow(study_uid="1.2.3", accession="A1", study_date="2024-06-12", patient_id="P1", sex="F", age=41,
                        study_description="MR LWS", modalities=("MR",), series_uids=("1.2.3.1", "1.2.3.2"),
                        series_descriptions=("W", "F"), instances=58),
             ManifestRow(accession="A2")]
    path = tmp_path / "manifest.csv"
    assert write_manifest(path, rows) == 2
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_manifest(path) == rows

    (tmp_path / "hand.csv").write_text("Accession\n")
    with pytest.raises(ManifestError, match="needs a study_uid or an accession column"):
        read_manifest(tmp_path / "hand.csv")
    (tmp_path / "hand.csv").write_text("\ufeffaccession,note\nA1,first\n\nA1,again\nA3,\n")
    assert [r.accession for r in read_manifest(tmp_path / "hand.csv")] == ["A1", "A3"]
    (tmp_path / "hand.csv").write_text("accession,study_uid\n,\nA1,\n")
    assert [r.accession for r in read_manifest(tmp_path / "hand.csv")] == ["A1"]
    (tmp_path / "hand.csv").write_text("accession,age\nA1,forty\n")
    with pytest.raises(ManifestError, match="line 2: age 'forty' is not a whole number"):
        read_manifest(tmp_path / "hand.csv")


def _identifier(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_filters() -> None:
    cohort = CohortFilter(date_from=date(2020, 1, 1), date_to=date(2020, 12, 31), modalities=("MR",),
                          body_parts=("lspine",), study_description="lumb", series_description="^t2",
                          age_min=40, age_max=49, sexes=("F",))
    sent = cohort.study_identifier()
    assert (sent.QueryRetrieveLevel, sent.StudyDate, sent.ModalitiesInStudy, sent.PatientSex) == (
        "STUDY", "20200101-20201231", "MR", "F")
    study = dict(StudyDate="20200612", StudyDescription="MR Lumbar spine", PatientSex="F", PatientAge="045Y")
    assert cohort.study_mismatch(_identifier(**study)) is None
    assert cohort.study_mismatch(_identifier(**{**study, "StudyDate": "20210101"})) == "study date outside the range"
    assert cohort.study_mismatch(_identifier(**{**study, "StudyDescription": "MR BRAIN"})) == "study description"
    assert cohort.study_mismatch(_identifier(**{**study, "PatientAge": "050Y"})) == "age outside the range"
    # Without PatientAge, the birth date and study date give the age (completed years).
    assert cohort.study_mismatch(_identifier(**{**study, "PatientAge": "", "PatientBirthDate": "19700613"})) is None
    assert cohort.study_mismatch(_identifier(**{**study, "PatientAge": "", "PatientBirthDate": "19700612"})) == (
        "age outside the range")
    assert cohort.study_mismatch(_identifier(**{**study, "PatientAge": ""})).startswith("age unknown")
    assert cohort.study_mismatch(_identifier(**{**study, "PatientSex": "M"})) == "sex"
    series = dict(Modality="MR", BodyPartExamined="LSPINE", SeriesDescription="T2_tse_tra")
    assert cohort.series_matches(_identifier(**series))
    assert not cohort.series_matches(_identifier(**{**series, "Modality": "CT"}))
    assert not cohort.series_matches(_identifier(**{**series, "BodyPartExamined": "SPINE"}))
    assert not cohort.series_matches(_identifier(**{**series, "SeriesDescription": "dixon t2"}))
    assert CohortFilter().study_mismatch(_identifier()) is None and CohortFilter().series_matches(_identifier())
    with pytest.raises(ValueError, match="not a regular expression"):
        CohortFilter(study_description="(")
    with pytest.raises(ValueError, match="ends before it starts"):
        CohortFilter(age_min=50, age_max=40)


def test_folder_target_refuses_paths_that_are_not_uids(tmp_path: Path) -> None:
    target = FolderTarget(tmp_path)
    target.keep("1.2", "1.2.3", "1.2.3.4", b"data")
    assert target.present("1.2", "1.2.3") == {"1.2.3.4"} and (tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm").is_file()
    with pytest.raises(ValueError, match="not a valid UID"):
        target.keep("1.2", "../../etc", "1.2.3.4", b"data")
    (target.incoming / "left.part").write_bytes(b"half")
    FolderTarget(tmp_path)
    assert not list(target.incoming.iterdir())


def test_tables_keep_types_and_always_have_a_header(tmp_path: Path) -> None:
    write_table(tmp_path, "t", [{"a": 1, "b": 2.5, "c": None, "d": "x"}, {"a": 2, "b": None, "c": None, "d": 3}],
                ("a", "b", "c", "d"))
    table = pq.read_table(tmp_path / "t.parquet")
    assert str(table.schema.field("a").type) == "int64" and str(table.schema.field("b").type) == "double"
    assert table.column("d").to_pylist() == ["x", "3"]
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b,c,d", "1,2.5,,x", "2,,,3"]
    write_table(tmp_path, "empty", [], ("a", "b"))
    assert (tmp_path / "empty.csv").read_text().strip() == "a,b"
    assert pq.read_table(tmp_path / "empty.parquet").column_names == ["a", "b"]


def _musclenode(config: Path, *args: str):
    import subprocess
    import sys

    from tests.peers import REPO

    return subprocess.run([sys.executable, "-m", "node", "--config", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cohort_commands_say_what_is_missing(tmp_path: Path) -> None:
    from tests.peers import free_port

    bare = tmp_path / "bare.toml"
    bare.write_text(f'[node]\nport = {free_port()}\ndata = "{tmp_path / "data"}"\n')
    result = _musclenode(bare, "cohort", "query", "--out", str(tmp_path / "m.csv"))
    assert result.returncode == 2 and "configure one [[pacs]] archive" in result.stderr

    config = tmp_path / "musclenode.toml"
    config.write_text(bare.read_text() + f'[[pacs]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                                        f'port = {free_port()}\n')
    (tmp_path / "m.csv").write_text("accession\nA1\n")
    result = _musclenode(config, "cohort", "fetch", str(tmp_path / "m.csv"), "--via", "move")
    assert result.returncode == 1 and "Start it first (musclenode serve" in result.stderr
    result = _musclenode(config, "cohort", "fetch", str(tmp_path / "m.csv"), "--via", "get")
    assert result.returncode == 2 and "--out FOLDER is needed" in result.stderr
    result = _musclenode(config, "cohort", "fetch", str(tmp_path / "m.csv"), "--via", "get", "--out",
                         str(tmp_path / "f"), "--attempts", "2", "--backoff", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed accession A1: no association with PACS@127.0.0.1" in result.stdout
    assert "(after 2 attempts)" in result.stdout
