"""JSON and JSONL files: readers whose errors name the file and spot, writers of plain JSON values.

Writers go through `jsonable`: numpy scalars and arrays become plain numbers and lists, paths strings, and
non-finite floats JSON null, so every file written is strict JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_JSON_NAMES = {dict: "object", list: "array"}


def read_json(path: str | Path, what: str, error: type[ValueError] = ValueError, expect: type | None = dict) -> Any:
    """Parse the JSON file `path` (described as `what` when missing); bad JSON raises `error` naming file and spot.

    With `expect` (default dict) a top-level value of another type is an `error` too; pass None to take any.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # str(e) carries the line and column
        raise error(f"{path}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_JSON_NAMES.get(expect, expect.__name__)} at the top level, "
                    f"got {type(value).__name__}")
    return value


def read_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line; blank lines, bad JSON and non-objects raise `error` naming file and line."""
    path = Path(path)
    with path.open() as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                raise error(f"{path} line {n}: blank line (every line must be one JSON record)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def jsonable(x: Any) -> Any:
    """`x` as plain JSON values: numpy scalars/arrays -> numbers/lists, paths -> str, non-finite floats -> None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray | np.generic):
        return jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """`value` (through `jsonable`) as JSON, newline-terminated."""
    Path(path).write_text(json.dumps(jsonable(value), indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (through `jsonable`; non-ASCII kept as is)."""
    with Path(path).open("w") as f:
        for row in rows:
            f.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
