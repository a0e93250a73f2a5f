"""CSV sink: one tidy CSV file per run, the same columns as :func:`sonde.load` returns."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from sonde.errors import StoreError
from sonde.records import Record
from sonde.run_info import RunInfo
from sonde.sinks.base import Sink

__all__ = ["COLUMNS", "CsvSink", "format_value"]

#: Header of every CSV file the sink writes, in this order (``message``: an alert's text, else empty).
COLUMNS = ("run", "step", "phase", "layer", "topic", "metric", "value", "message")


def format_value(value: float | np.ndarray) -> str:
    """The text of a value in the ``value`` column.

    Floats use Python's shortest round-tripping form (``nan`` and ``inf`` included); arrays
    are their elements in that form, separated by single spaces.

    Example:
        >>> format_value(0.25), format_value(np.array([1.0, 2.5]))
        ('0.25', '1.0 2.5')
    """
    if isinstance(value, np.ndarray):
        return " ".join(repr(float(x)) for x in value.ravel())
    return repr(float(value))


class CsvSink(Sink):
    """Writes Records to ``<directory>/<run name>/records.csv``.

    The file has the header ``run,step,phase,layer,topic,metric,value`` and one row per
    Record. Network-wide records have an empty ``layer``. Array values (``histogram``
    counts, ``histogram_edges``) are written in the ``value`` column as space-separated
    numbers, e.g. ``"0.0 3.0 12.0"``; read them back with
    ``np.array(cell.split(), dtype=float)``. Scalars are written so they round-trip exactly.
    The last column, ``message``, holds an ``alert``'s readable text and is empty otherwise
    (``pandas.read_csv(..., keep_default_na=False)`` keeps it a string).

    A new run (``RunInfo.resume`` false) starts the file afresh; a resumed run appends to it
    and writes the header only if the file is new or empty.

    Args:
        directory: Parent directory; each run gets its own subdirectory.

    Example:
        >>> sink = CsvSink(directory="runs")                # doctest: +SKIP
        >>> sink.open(RunInfo(name="mlp"))                  # doctest: +SKIP
        >>> sink.write([Record("mlp", 0, "train", "fc1", "weights", "norm", 1.5)])  # doctest: +SKIP
        >>> sink.close()                                    # doctest: +SKIP
        >>> pandas.read_csv("runs/mlp/records.csv", keep_default_na=False)  # doctest: +SKIP
    """

    name = "csv"

    def __init__(self, directory: str | os.PathLike[str] = "runs") -> None:
        self.directory = os.fspath(directory)
        self.path: str | None = None
        self._file: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None

    def open(self, run: RunInfo) -> None:
        folder = os.path.join(self.directory, run.name)
        self.path = os.path.join(folder, "records.csv")
        try:
            os.makedirs(folder, exist_ok=True)
            # newline="" lets the csv module own line endings, as its documentation requires.
            self._file = open(self.path, "a" if run.resume else "w", newline="", encoding="utf-8")
        except OSError as exc:
            raise StoreError(
                f"cannot write CSV records to {self.path!r}: {exc}; pass a writable directory= to CsvSink"
            ) from exc
        columns: Sequence[str] = COLUMNS
        if self._file.tell() > 0:  # resuming: keep the file's own header (an older one lacks message)
            with open(self.path, encoding="utf-8", newline="") as existing:
                header = next(csv.reader(existing), None)
            if header and set(header) <= set(COLUMNS):
                columns = header
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")
        if self._file.tell() == 0:
            self._writer.writeheader()

    def write(self, records: Sequence[Record]) -> None:
        if self._writer is None:
            raise RuntimeError("CsvSink.write() called before open(); open the sink with a RunInfo first")
        self._writer.writerows(
            {
                "run": r.run,
                "step": r.step,
                "phase": r.phase,
                "layer": r.layer,
                "topic": r.topic,
                "metric": r.metric,
                "value": format_value(r.value),
                "message": r.message,
            }
            for r in records
        )

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self, status: str = "finished") -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None
