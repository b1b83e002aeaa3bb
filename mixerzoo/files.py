"""Result files that survive an interrupted run."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that ``path`` always holds either the old or the new file: results
    are rewritten while a long run goes on, and a run killed mid-write must not leave a
    truncated file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, newline="")  # the text as given: CSV rows keep their own line ends
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, written as :func:`write_text_atomic` does."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_csv_atomic(path: str | Path, columns: list[str] | tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV with a header of ``columns`` (other keys left out, lists joined by
    spaces), written as :func:`write_text_atomic` does."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


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
