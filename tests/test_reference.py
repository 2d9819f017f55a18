"""The reference standard: shipped table, stratum choice, z-scores, methods never mixed.

Site references (centile curves) are tested in tests/test_centiles.py.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from inference.patient import from_sidecar
from reports.reference import (
    PUBLISHED_VERSION,
    ReferenceRow,
    ReferenceTable,
    ReferenceTableError,
    compare,
    level_key,
    load_table,
    muscle_key,
    normal_percentile,
    published_table,
)

DATA = Path(__file__).resolve().parents[1] / "reports" / "data"
FF = "fat_fraction_percent"


def person(age=45, sex="F", height_m=1.70, weight_kg=65.0):
    return from_sidecar({"age": age, "sex": sex, "height_m": height_m, "weight_kg": weight_kg})


def row(**changes) -> ReferenceRow:
    base = dict(method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5", sex="any", age_low=20,
                age_high=29, age_specific=True, mean=16.0, sd=5.0, n=20, source="test", note="")
    return ReferenceRow(**{**base, **changes})


# --- the shipped table ---------------------------------------------------------------------------


def test_shipped_table_parses_with_its_version():
    table = published_table()
    assert table.version == PUBLISHED_VERSION == "reference-v1"
    assert len(table.rows) == 28
    assert {r.method for r in table.rows} == {"dixon_ff"}  # no usable t1t2_threshold norms published


def test_every_source_is_cited_in_the_readme_and_the_sources_file():
    table = published_table()
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `([a-z0-9]+)`$", readme, flags=re.M))
    used = {r.source for r in table.rows}
    assert used <= headings, f"sources without a README citation: {used - headings}"
    assert used == set(table.citations), "sources file and table disagree"
    assert all(table.links[s].startswith("https://") for s in used)


def test_shipped_table_has_no_duplicate_keys():
    with open(DATA / "reference-v1.csv", newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    keys = [(r["method"], r["muscle"], r["measurement"], r["levels"], r["sex"], r["age_low"], r["age_high"])
            for r in raw]
    assert len(keys) == len(set(keys)) == 28


def test_duplicate_keys_and_unknown_sources_are_refused(tmp_path):
    with pytest.raises(ReferenceTableError, match="repeats the key"):
        ReferenceTable("t", (row(), row(mean=17.0)))
    with pytest.raises(ReferenceTableError, match="no citation"):
        ReferenceTable("t", (row(),), {"other": "Other 2020"})
    text = (DATA / "reference-v1.csv").read_text(encoding="utf-8")
    bad = tmp_path / "reference-v9.csv"
    bad.write_text(text.replace(",10.7,40,", ",-10.7,40,", 1), encoding="utf-8")
    with pytest.raises(ReferenceTableError, match="line 2"):
        load_table(bad)


def test_vocabulary_is_canonical():
    assert muscle_key(["erector_spinae", "multifidus"]) == "multifidus+erector_spinae"
    assert level_key("l3\u2013l5") == "L3-L5" and level_key("L5-L5") == "L5" and level_key("Lumbar") == "lumbar"
    assert level_key("T12-S1") == "T12-S1"  # any range of the vocabulary's vertebrae
    for bad in ("L5-L3", "L6", "L1-X1", "L3-L4-L5"):
        with pytest.raises(ReferenceTableError):
            level_key(bad)
    with pytest.raises(ReferenceTableError):
        muscle_key("gluteus_maximus")


# --- z-scores and percentiles --------------------------------------------------------------------


def test_z_and_percentile_equal_hand_computed_values():
    # Crawford 2016 AJNR, women, MF+ES over L1-L5: 17.8 +/- 10.7.
    result = compare(28.5, method="dixon_ff", muscle="multifidus+erector_spinae", measurement=FF,
                     levels="L1-L5", patient=person(45, "F"))
    assert result.z == pytest.approx((28.5 - 17.8) / 10.7) == pytest.approx(1.0)
    assert result.percentile == pytest.approx(84.13447460685429)
    assert result.stratum.source == "crawford2016ajnr" and result.stratum.n == 40
    assert result.reference_version == "reference-v1" and "normal CDF" in result.percentile_basis
    # Men at L5: 25.7 +/- 8.0.
    men = compare(17.7, method="dixon_ff", muscle="multifidus+erector_spinae", measurement=FF, levels="L5",
                  patient=person(30, "M"))
    assert men.z == pytest.approx(-1.0) and men.percentile == pytest.approx(15.865525393145708)


def test_percentile_is_the_normal_cdf():
    assert normal_percentile(0.0) == 50.0
    assert normal_percentile(1.959963984540054) == pytest.approx(97.5)


def test_most_specific_group_then_larger_n():
    # Erector spinae L3-L5 (Sollmann 2020): women by sex (n 52) beat the age band (n 38) ...
    woman = compare(20.0, method="dixon_ff", muscle="erector_spinae", measurement=FF, levels="L3-L5",
                    patient=person(30, "F"))
    assert (woman.stratum.mean, woman.stratum.sd, woman.stratum.n) == (18.2, 6.8, 52)
    # ... men by sex (n 24) lose to the age band < 38 (n 38).
    man = compare(20.0, method="dixon_ff", muscle="erector_spinae", measurement=FF, levels="L3-L5",
                  patient=person(30, "M"))
    assert (man.stratum.mean, man.stratum.sd, man.stratum.n) == (12.3, 5.6, 38)
    # A group with an unknown n (Si 2023, by sex) ranks below an age band of known n (Crawford by decade).
    multifidus = compare(20.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                         patient=person(45, "F"))
    assert (multifidus.stratum.source, multifidus.stratum.mean) == ("crawford2016ssd", 21.6)


def test_sex_and_age_band_both_specific_wins():
    table = ReferenceTable("t", (row(sex="any", n=500), row(sex="F", n=10), row(sex="F", age_specific=False,
                                                                                    age_low=20, age_high=69, n=900)))
    result = compare(16.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                     patient=person(25, "F"), table=table)
    assert result.stratum.n == 10


def test_missing_sex_gives_no_z_and_says_why():
    patient = from_sidecar({"age": 45})
    result = compare(30.0, method="dixon_ff", muscle="multifidus+erector_spinae", measurement=FF, levels="L5",
                     patient=patient)
    assert result.z is None and result.percentile is None and result.stratum is None
    assert "sex is missing (sex not in the sidecar)" in result.reason
    assert "sex-specific" in result.reason


def test_missing_age_gives_no_z_when_every_group_is_an_age_band():
    table = ReferenceTable("t", (row(), row(age_low=30, age_high=39, mean=20.0)))
    patient = from_sidecar({"sex": "F"})
    result = compare(16.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                     patient=patient, table=table)
    assert result.z is None
    assert "age is missing (age not in the sidecar)" in result.reason and "age bands" in result.reason


def test_missing_age_uses_a_whole_cohort_group_and_says_so():
    result = compare(20.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                     patient=from_sidecar({"sex": "M"}))
    assert result.stratum.source == "si2023" and result.stratum.mean == 16.21
    assert any("age unknown" in note for note in result.notes)


def test_age_outside_every_group():
    result = compare(20.0, method="dixon_ff", muscle="multifidus+erector_spinae", measurement=FF, levels="L5",
                     patient=person(75, "F"))
    assert result.z is None and "age 75 is outside" in result.reason


def test_age_38_falls_between_sollmann_bands():
    result = compare(20.0, method="dixon_ff", muscle="erector_spinae", measurement=FF, levels="L3-L5",
                     patient=from_sidecar({"age": 38}))
    assert result.z is None
    assert "sex is missing" in result.reason and "outside the groups' ages" in result.reason


def test_levels_must_match_exactly():
    unknown = compare(20.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels=None,
                      patient=person())
    assert unknown.z is None and "levels are unknown" in unknown.reason
    other = compare(20.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L4",
                    patient=person())
    assert other.z is None and "available: L1-L5" in other.reason


def test_no_csa_norms_are_shipped():
    result = compare(900.0, method="dixon_ff", muscle="multifidus", measurement="csa_mm2", levels="L4",
                     patient=person())
    assert result.z is None and "csa_mm2" in result.reason


# --- methods are never mixed ---------------------------------------------------------------------


def test_threshold_value_never_gets_a_dixon_reference():
    table = published_table()
    for key in {(r.muscle, r.measurement, r.levels) for r in table.rows}:
        muscle, measurement, levels = key
        result = compare(20.0, method="t1t2_threshold", muscle=muscle, measurement=measurement, levels=levels,
                         patient=person(45, "F"))
        assert result.z is None and result.stratum is None
        assert result.reason.startswith("no reference for this method")


def test_pipeline_method_names_map_onto_reference_methods():
    gmm = compare(20.0, method="gmm3", muscle="multifidus+erector_spinae", measurement=FF, levels="L1-L5",
                  patient=person(45, "F"))
    assert gmm.z is None and gmm.method == "t1t2_threshold"
    assert gmm.reason.startswith("no reference for this method")
    vendor = compare(28.5, method="dixon_vendor_ff", muscle="multifidus+erector_spinae", measurement=FF,
                     levels="L1-L5", patient=person(45, "F"))
    assert vendor.method == "dixon_ff" and vendor.z == pytest.approx(1.0)


def test_threshold_value_uses_only_threshold_rows():
    table = ReferenceTable("t", (row(method="dixon_ff", mean=10.0), row(method="t1t2_threshold", mean=30.0)))
    result = compare(30.0, method="t1t2_threshold", muscle="multifidus", measurement=FF, levels="L1-L5",
                     patient=person(25), table=table)
    assert result.stratum.mean == 30.0 and "t1t2_threshold" in result.stratum.description
    dixon = compare(30.0, method="dixon_ff", muscle="multifidus", measurement=FF, levels="L1-L5",
                    patient=person(25), table=table)
    assert dixon.stratum.mean == 10.0
