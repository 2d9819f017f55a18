"""The cohort manifest: a CSV with one row per study, written by ``cohort query`` or by hand.

Columns (``cohort query`` writes all of them; a hand-written manifest needs only ``accession``
or ``study_uid``):

=====================  ===========================================================================
``study_uid``          StudyInstanceUID (found from ``accession`` by C-FIND when empty)
``accession``          AccessionNumber
``study_date``         StudyDate, ``YYYY-MM-DD``
``patient_id``         PatientID (the link back to the hospital's records; keep the file private)
``sex``                PatientSex (M, F, O, or empty)
``age``                age at the study in completed years (empty when unknown)
``study_description``  StudyDescription
``modalities``         modalities of the matching series, ``;``-separated
``series_uids``        the matching series, ``;``-separated; empty: fetch the whole study
``series_descriptions``their SeriesDescriptions, ``;``-separated, in the same order
``instances``          instances in the matching series, as the archive counted them
=====================  ===========================================================================
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

__all__ = ["COLUMNS", "ManifestError", "ManifestRow", "read_manifest", "write_manifest"]

_SEPARATOR = ";"


class ManifestError(ValueError):
    """The manifest cannot be read: no file, no usable column, or a row without a study."""


@dataclass(frozen=True)
class ManifestRow:
    """One study of a cohort (see the module docstring for the columns)."""

    study_uid: str = ""
    accession: str = ""
    study_date: str = ""
    patient_id: str = ""
    sex: str = ""
    age: int | None = None
    study_description: str = ""
    modalities: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    series_descriptions: tuple[str, ...] = ()
    instances: int | None = None

    @property
    def key(self) -> str:
        """How the study is named in messages: its UID, else its accession number."""
        return self.study_uid or f"accession {self.accession}"


COLUMNS = tuple(f.name for f in fields(ManifestRow))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return _SEPARATOR.join(value)
    return str(value)


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow]) -> int:
    """Write the rows (atomically: a reader never sees half a file); return how many."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.part")
    count = 0
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(getattr(row, column)) for column in COLUMNS])
            count += 1
    os.replace(temporary, path)
    return count


def _integer(text: str, column: str, line: int) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ManifestError(f"line {line}: {column} {text!r} is not a whole number") from None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest; rows that name the same study twice are kept once.

    Raises
    ------
    ManifestError
        When the file has neither a ``study_uid`` nor an ``accession`` column, or a row has
        neither value, or a number column holds something else.
    """
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"{path}: {exc.strerror or exc}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if "study_uid" not in header and "accession" not in header:
            raise ManifestError(f"{path}: needs a study_uid or an accession column (found: {', '.join(header) or 'none'})")
        rows: list[ManifestRow] = []
        seen: set[str] = set()
        for line, raw in enumerate(reader, start=2):
            values = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k}
            if not any(values.values()):
                continue
            row = ManifestRow(
                study_uid=values.get("study_uid", ""),
                accession=values.get("accession", ""),
                study_date=values.get("study_date", ""),
                patient_id=values.get("patient_id", ""),
                sex=values.get("sex", ""),
                age=_integer(values.get("age", ""), "age", line),
                study_description=values.get("study_description", ""),
                modalities=tuple(v for v in values.get("modalities", "").split(_SEPARATOR) if v),
                series_uids=tuple(v for v in values.get("series_uids", "").split(_SEPARATOR) if v),
                series_descriptions=tuple(v for v in values.get("series_descriptions", "").split(_SEPARATOR) if v),
                instances=_integer(values.get("instances", ""), "instances", line),
            )
            if not row.study_uid and not row.accession:
                raise ManifestError(f"{path}, line {line}: neither study_uid nor accession")
            if row.key not in seen:
                seen.add(row.key)
                rows.append(row)
    return rows
