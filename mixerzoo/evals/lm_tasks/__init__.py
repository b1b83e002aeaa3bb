"""The bundled offline lm-eval task suite: YAML configs here, JSONL data beside them.

Group ``mixerzoo_offline`` = ``mixerzoo_choice`` (multiple choice, acc / acc_norm) +
``mixerzoo_perplexity`` (``loglikelihood_rolling``: word_perplexity, byte_perplexity,
bits_per_byte). The YAMLs load their data through ``custom_dataset`` (see :mod:`.data`), so
they need no absolute paths and work from wherever the package is installed; point lm-eval's
``TaskManager(include_path=TASKS_DIR)`` (or ``--include_path``) at this folder.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
GROUP = "mixerzoo_offline"
TASKS = ("mixerzoo_choice", "mixerzoo_perplexity")
BUNDLED = (GROUP, *TASKS)  # every name the YAMLs here define
