"""Train every requested mixer on a synthetic task and report recall accuracy.

A sweep is the product (sequence length × width × mixer × seed × learning rate). Each run
builds a fresh model with ``build_model`` (same size, so parameter counts are matched by the
model API), trains it with AdamW, linear warmup and cosine decay on batches generated on the
fly, evaluates on a fixed held-out set every ``eval_every`` steps and stops once accuracy
reaches ``early_stop``. Per (mixer, length, width, seed) the learning rate with the best
accuracy is kept; the summary reports its mean and spread over seeds, as Zoology does.

    from mixerzoo.evals.synthetic import preset, run_synthetic, format_table
    results = run_synthetic(preset("demo", out_dir="runs/demo"))
    print(format_table(results))

Accuracy is per token at the labelled positions (argmax of the logits equals the label),
counted over the whole evaluation set. Files written to ``out_dir``: ``results.json`` (the
config, every run with its evaluation history, the summary), ``results.csv`` (one row per
run), ``summary.csv`` (one row per mixer and point of the sweep), ``accuracy.png`` and, with
``eval_length_factors``, ``length.csv`` and ``length.png``. They are rewritten after every run
(``"complete": false`` until the sweep ends), so a sweep that is stopped part-way keeps the
runs it finished, and a rerun into the same folder trains only the runs still missing.

Modules: ``config`` (what a sweep runs), ``training`` (one run), ``sweep`` (all runs, resumed
and optionally on several processes), ``results`` (lr selection, summary, files, table),
``presets`` (the built-in sweeps), ``experiments`` (YAML files and ``--set`` keys; the shipped
files live in ``experiments/``).
"""

from .config import PRECISIONS, X_AXES, SyntheticRunConfig, resolve_device, resolve_mixers
from .presets import PRESETS, SMALL_MODEL_OPTIONS, preset
from .results import (RUN_COLUMNS, SUMMARY_COLUMNS, format_table, param_spread, select_best_lr,
                      summarise, write_results)
from .sweep import run_synthetic
from .training import EarlyStopper, evaluate, masked_accuracy, train_one, warmup_cosine

__all__ = [
    "PRECISIONS", "PRESETS", "RUN_COLUMNS", "SMALL_MODEL_OPTIONS", "SUMMARY_COLUMNS", "X_AXES",
    "EarlyStopper", "SyntheticRunConfig", "evaluate", "format_table", "masked_accuracy",
    "param_spread", "preset", "resolve_device", "resolve_mixers", "run_synthetic",
    "select_best_lr", "summarise", "train_one", "warmup_cosine", "write_results",
]
