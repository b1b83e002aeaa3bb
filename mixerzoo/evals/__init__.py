"""Evaluation: synthetic recall sweeps (``mixerzoo.evals.synthetic``) and their plots
(``mixerzoo.evals.plot``). Submodules are imported on use; nothing heavy loads here."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SyntheticRunConfig": "mixerzoo.evals.synthetic",
    "run_synthetic": "mixerzoo.evals.synthetic",
    "preset": "mixerzoo.evals.synthetic",
    "format_table": "mixerzoo.evals.synthetic",
    "plot_summary": "mixerzoo.evals.plot",
}


def __getattr__(attr: str) -> Any:
    if attr in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[attr]), attr)
    raise AttributeError(f"module 'mixerzoo.evals' has no attribute {attr!r}")


__all__ = sorted(_EXPORTS)
