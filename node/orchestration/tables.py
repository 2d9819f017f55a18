"""Cohort tables, each written as CSV and as Parquet (``pyarrow``), atomically and always with a header.

A column's Parquet type is inferred from its values (numbers stay numbers, empty cells are null);
a column whose values mix types that Arrow cannot unify is written as text.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["write_table"]


def _arrow_column(values: list[Any]):
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def write_table(folder: Path, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[Path]:
    """Write ``NAME.csv`` and ``NAME.parquet`` in ``folder``; return their paths.

    Columns are ``columns`` in that order; keys of a row outside them are not written. With no
    rows, both files still carry the columns (the Parquet columns typed as text).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = folder / f"{name}.csv", folder / f"{name}.parquet"
    temporary = folder / f".{name}.csv.part"
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, csv_path)

    if rows:
        table = pa.table({c: _arrow_column([row.get(c) for row in rows]) for c in columns})
    else:
        table = pa.table({c: pa.array([], type=pa.string()) for c in columns})
    temporary = folder / f".{name}.parquet.part"
    pq.write_table(table, temporary)
    os.replace(temporary, parquet_path)
    return [csv_path, parquet_path]
