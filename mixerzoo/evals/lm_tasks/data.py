"""Dataset loaders named by the task YAMLs (``custom_dataset: !function ...``).

lm-eval calls them with the task's metadata (and on the command line the model arguments
too) as keyword arguments; they need none, hence ``**_``. The rows are read from the JSONL
files beside this module into in-memory ``datasets.Dataset``s: no cache folder, no network.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _split(name: str):
    import datasets

    path = HERE / name
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.Dataset.from_list(rows)


def choice_dataset(**_) -> dict:
    """``mixerzoo_choice``: ``{"validation": few-shot pool, "test": scored examples}``."""
    return {"validation": _split("choice.validation.jsonl"), "test": _split("choice.test.jsonl")}


def text_dataset(**_) -> dict:
    """``mixerzoo_perplexity``: ``{"test": documents}``."""
    return {"test": _split("text.test.jsonl")}
