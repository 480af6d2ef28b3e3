"""Reading JSON files received from others (configs, metadata) with errors that name the file and spot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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



def finite(d):  # TEMPORARY SHIM
    import math
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}
