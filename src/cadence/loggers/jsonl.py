"""``metrics.jsonl``: one JSON object per log point, appended and flushed as it happens; and its one reader.

Every line is strict JSON (RFC 8259), so ``json.loads``, ``JSON.parse`` and ``jq`` read it: a non-finite
number is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (JavaScript's names for them),
and :func:`read_jsonl` turns those strings back into floats. The reader skips damaged lines (a line cut short
by a crash, binary garbage, a record of the wrong shape) with one warning naming the file.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from .. import killpoints

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Fields of a record that hold numbers (or null); anything else there makes the line damaged.
NUMBERS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "elapsed_s", "value", "skipped_total")

_warned: set[tuple[str, int, int]] = set()  # (file, mtime, size) already reported, so each damage warns once


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name (``"NaN"``, ``"Infinity"``, ``"-Infinity"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def encode(record: dict[str, Any]) -> str:
    """One line of ``metrics.jsonl`` (with its newline), strict JSON."""
    return json.dumps(strict(record), allow_nan=False) + "\n"


def _number(value: Any) -> Any:
    """A number (non-finite names decoded), ``None``; raises ``ValueError`` for anything else."""
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError(f"not a number: {value!r}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not JSON")


def decode(line: bytes | str) -> dict[str, Any]:
    """One record from one line; ``ValueError`` when the line is not a well-formed record."""
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    record = json.loads(text, parse_constant=_reject_constant)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step {step!r} is not a step number")
    if not isinstance(record.get("split", ""), str) or not isinstance(record.get("epoch", 0), int):
        raise ValueError("split or epoch of the wrong type")
    for key in NUMBERS:
        if key in record:
            record[key] = _number(record[key])
    parts = record.get("parts")
    if parts is not None:
        if not isinstance(parts, dict):
            raise ValueError("parts is not an object")
        record["parts"] = {str(k): _number(v) for k, v in parts.items()}
    return record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order; damaged lines are skipped with one warning naming the file.

    A missing file has no records. Files written before cadence wrote strict JSON (bare ``NaN``) read too.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records, bad_lines, first = [], 0, ""
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(decode(_legacy(line)))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            bad_lines += 1
            first = first or f"line {number}: {str(err)[:80]}"
    if bad_lines:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{path}: skipped {bad_lines} damaged line(s) ({first})", stacklevel=2)
    return records


def _legacy(line: bytes) -> bytes:
    """Bare ``NaN``/``Infinity`` of files written by older versions, as the strict names."""
    if b"NaN" in line or b"Infinity" in line:
        try:
            return json.dumps(strict(json.loads(line))).encode()
        except ValueError:
            return line
    return line


class JsonlLogger:
    """Opens the file at the first record, so a run that fails before logging leaves no file behind."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: Any = None

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(encode(record))
        self._file.flush()
        if killpoints.ACTIVE:
            killpoints.reached("metrics.write", record.get("step"))

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
