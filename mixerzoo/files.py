"""Result files that survive an interrupted run."""

from __future__ import annotations

import json
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
