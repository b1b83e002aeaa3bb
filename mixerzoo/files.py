"""Result files that survive an interrupted run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON so that ``path`` always holds either the old or the new file:
    results are rewritten while a long run goes on, and a run killed mid-write must not leave
    a truncated file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def check_out_dir(out_dir: str | Path, what: str = "out_dir") -> None:
    """Refuse an ``out_dir`` the results could not be written to: an existing file, a path
    under a file, or a folder without write permission. Run before any training, so that a
    sweep never ends in an error about where it was meant to go. ``what`` names the path in
    the message (the CLI's ``--out``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {str(out)!r} is an existing file, not a folder: choose another path")
    parent = out
    while not parent.exists():  # the nearest existing ancestor, where mkdir would start
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {str(out)!r} lies under the file {str(parent)!r}: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(out)!r}: no permission to write in {str(parent)!r}")


def jsonable(obj: Any) -> Any:
    """``obj`` with string keys, tuples as lists and NaN/inf as None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    return obj
