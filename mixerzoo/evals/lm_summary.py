"""The LM comparison's table: every mixer's runs over seeds, mean and spread.

Reads what ``scripts/lm_compare.sh`` leaves in its output folder: ``{mixer}_s{seed}/`` (a
``mixerzoo train`` run: ``train_config.json``, ``metrics.jsonl``) and ``eval_{mixer}_s{seed}/``
(lm-eval's ``results_*.json``, the newest one counts). A run that stopped before its configured
step count is listed as unfinished and left out of the means, so a table never mixes budgets.

    python -m mixerzoo.evals.lm_summary results/lm_compare     # summary.{json,csv,md}

A learning-rate sweep (``scripts/lm_sweep.sh``) keeps one such folder per learning rate,
``OUT/lr{lr}/``: ``--best-lrs`` prints each mixer's best learning rate (lowest final
validation loss of its seed-0 runs, once every swept rate has one), and ``--sweep`` writes
OUT/sweep.{json,csv,md}: the sweep per mixer and the seeds at its best rate.

    python -m mixerzoo.evals.lm_summary results/sweep --sweep
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from mixerzoo.files import write_csv_atomic, write_json_atomic, write_text_atomic
from mixerzoo.train.config import saved_split_seed
from mixerzoo.train.metrics import compare_runs, read_metrics

_RUN = re.compile(r"^(?P<mixer>.+)_s(?P<seed>\d+)$")
_LR_DIR = re.compile(r"^lr(?P<lr>[0-9.eE+-]+)$")
# lm-eval's metric keys are "name,filter"; stderr entries are reported beside, not averaged
_SKIP = ("_stderr", "alias", "samples")


def lm_eval_metrics(eval_dir: Path) -> dict[str, float]:
    """``{"task/metric": value}`` from the newest lm-eval results file under ``eval_dir``."""
    files = sorted(eval_dir.rglob("results_*.json"), key=lambda p: p.name)
    if not files:
        return {}
    results = json.loads(files[-1].read_text()).get("results", {})
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not any(s in key for s in _SKIP):
                out[f"{task}/{key.split(',')[0]}"] = float(value)
    return out


def collect_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per ``{mixer}_s{seed}`` run folder with a metrics.jsonl, sorted by mixer, seed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a folder (give the OUT of scripts/lm_compare.sh)")
    rows = []
    for run in sorted(p for p in out_dir.iterdir() if p.is_dir() and _RUN.match(p.name)):
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            continue
        records = read_metrics(metrics)
        if not any("loss" in r for r in records):
            continue
        m = _RUN.match(run.name)
        config_file = run / "train_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        target = config.get("steps")
        row = compare_runs({run.name: records})["runs"][run.name]
        # the trainer stops a run whose loss is no longer finite, after logging that loss
        diverged = any(isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]) for r in records)
        rows.append({"mixer": m["mixer"], "seed": int(m["seed"]), "run": run.name, "target_steps": target,
                     "lr": config.get("lr"), "diverged": diverged,
                     "split_seed": saved_split_seed(config) if config else None,
                     "finished": target is not None and row["steps"] >= target, **row,
                     **lm_eval_metrics(out_dir / f"eval_{run.name}")})
    return sorted(rows, key=lambda r: (r["mixer"], r["seed"]))


def summarise_lm(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mixer over its finished runs: n, seeds, and ``{metric}_mean`` / ``{metric}_std``
    (sample standard deviation; None with one seed) for validation and lm-eval metrics, and
    ``{metric}_n``, the seeds that have it (fewer than n where, say, an lm-eval run failed)."""
    metrics = ["final_val_loss", "final_val_bpb", "median_tok_per_s", "peak_mem_gib"]
    metrics += sorted({k for r in rows for k in r if "/" in k})
    out = []
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        done = [r for r in rows if r["mixer"] == mixer and r["finished"]]
        entry: dict[str, Any] = {"mixer": mixer, "n": len(done), "seeds": [r["seed"] for r in done],
                                 "unfinished": [r["run"] for r in rows if r["mixer"] == mixer and not r["finished"]]}
        for name in metrics:
            values = [r[name] for r in done if r.get(name) is not None]
            entry[f"{name}_mean"] = statistics.fmean(values) if values else None
            entry[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{name}_n"] = len(values)
        out.append(entry)
    return out


def _cell(entry: dict[str, Any], key: str, digits: int) -> str:
    mean, std, n = entry.get(f"{key}_mean"), entry.get(f"{key}_std"), entry.get(f"{key}_n", 0)
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + (f" ({n} of {entry['n']} seeds)" if n < entry["n"] else "")


def format_markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None) -> str:
    """The table RESULTS.md quotes: mean ± sample std over the finished seeds; with ``rows``, a
    warning when the runs were validated on different documents (several split seeds)."""
    cols = [("final_val_bpb", "val bits/byte", 4), ("final_val_loss", "val loss", 4),
            ("mixerzoo_choice/acc", "choice acc", 3), ("mixerzoo_choice/acc_norm", "choice acc_norm", 3),
            ("mixerzoo_perplexity/bits_per_byte", "lm-eval bits/byte", 3)]
    lines = ["| mixer | seeds | " + " | ".join(c[1] for c in cols) + " | unfinished |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for e in summary:
        cells = [_cell(e, k, d) for k, _, d in cols]
        seeds = ", ".join(map(str, e["seeds"])) or "none"
        lines.append(f"| `{e['mixer']}` | {seeds} | " + " | ".join(cells) + f" | {', '.join(e['unfinished']) or '–'} |")
    splits = sorted({r["split_seed"] for r in rows or [] if r.get("finished") and r.get("split_seed") is not None})
    if len(splits) > 1:
        lines += ["", f"Warning: these runs were validated on different documents (split seeds {splits}); "
                      "their validation losses do not compare across split seeds."]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path) -> dict[str, Path]:
    """summary.json (runs and per-mixer statistics), summary.csv (runs), summary.md (table)."""
    out_dir = Path(out_dir)
    rows = collect_runs(out_dir)
    if not rows:
        raise FileNotFoundError(f"{out_dir} holds no {{mixer}}_s{{seed}} run with a metrics.jsonl")
    summary = summarise_lm(rows)
    paths = {"json": out_dir / "summary.json", "csv": out_dir / "summary.csv", "md": out_dir / "summary.md"}
    write_json_atomic(paths["json"], {"runs": rows, "mixers": summary})
    write_csv_atomic(paths["csv"], list(dict.fromkeys(k for r in rows for k in r)), rows)
    write_text_atomic(paths["md"], format_markdown(summary, rows))
    return paths


def sweep_folders(out_dir: str | Path, lrs: list[float] | None = None) -> dict[float, Path]:
    """``{lr: folder}`` for the ``lr{lr}/`` folders of a sweep (only the rates ``lrs`` when
    given; each of them must have its folder)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a folder (give the OUT of scripts/lm_sweep.sh)")
    found: dict[float, Path] = {}
    for sub in sorted(out_dir.iterdir()):
        m = _LR_DIR.match(sub.name)
        if not (sub.is_dir() and m):
            continue
        try:
            lr = float(m["lr"])
        except ValueError:
            continue  # a folder named like lr-x is not a rate
        if lr in found:
            raise ValueError(f"{found[lr]} and {sub} hold the same learning rate {lr:g}; merge or remove one")
        found[lr] = sub
    if lrs is None:
        return found
    missing = [f"{lr:g}" for lr in lrs if lr not in found]
    if missing:
        raise FileNotFoundError(f"{out_dir} has no folder for the learning rate(s) {missing} (lr<rate>/)")
    return {lr: found[lr] for lr in lrs}


def collect_sweep(out_dir: str | Path, lrs: list[float] | None = None,
                  mixers: list[str] | None = None) -> dict[float, list[dict[str, Any]]]:
    """``{lr: runs}`` from the ``lr{lr}/`` folders of a sweep (see :func:`collect_runs`),
    restricted to the rates ``lrs`` and the mixers ``mixers`` when given."""
    return {lr: [r for r in collect_runs(folder) if mixers is None or r["mixer"] in mixers]
            for lr, folder in sweep_folders(out_dir, lrs).items()}


def _final_loss(row: dict[str, Any]) -> float:
    value = row.get("final_val_loss")
    if row.get("diverged"):
        return math.inf
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def best_lrs(sweep: dict[float, list[dict[str, Any]]], mixers: list[str] | None = None) -> dict[str, float | None]:
    """Each mixer's learning rate of lowest final validation loss over its seed-0 runs, the
    finished and the diverged (an infinite loss); None while a swept rate has neither for that
    mixer. ``mixers`` (default: every mixer found) fixes the order and the names."""
    mixers = list(dict.fromkeys(r["mixer"] for rows in sweep.values() for r in rows)) if mixers is None else mixers
    best: dict[str, float | None] = {}
    for mixer in mixers:
        seed0 = {lr: next((r for r in rows if r["mixer"] == mixer and r["seed"] == 0
                           and (r["finished"] or r["diverged"])), None)
                 for lr, rows in sweep.items()}
        if any(r is None for r in seed0.values()) or all(_final_loss(r) == math.inf for r in seed0.values()):
            best[mixer] = None
        else:
            best[mixer] = min(seed0, key=lambda lr: (_final_loss(seed0[lr]), lr))
    return best


def format_sweep_markdown(sweep: dict[float, list[dict[str, Any]]], best: dict[str, float | None],
                          at_best: list[dict[str, Any]]) -> str:
    lrs = sorted(sweep)
    lines = ["Final validation loss (nats/token) of seed 0 at each learning rate:", "",
             "| mixer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
             "|---|" + "---|" * len(lrs) + "---|"]
    for mixer, lr_best in best.items():
        cells = []
        for lr in lrs:
            row = next((r for r in sweep[lr] if r["mixer"] == mixer and r["seed"] == 0), None)
            if row is None:
                cells.append("–")
            else:
                value = _final_loss(row)
                text = "diverged" if row.get("diverged") or value == math.inf else f"{value:.4f}"
                cells.append(text if row["finished"] or row.get("diverged") else f"{text} (unfinished)")
        lines.append(f"| `{mixer}` | " + " | ".join(cells) + f" | {'–' if lr_best is None else f'{lr_best:g}'} |")
    lines += ["", "At each mixer's best learning rate, over its seeds:", "",
              format_markdown(summarise_lm(at_best), at_best)]
    return "\n".join(lines)


def write_sweep(out_dir: str | Path, lrs: list[float] | None = None,
                mixers: list[str] | None = None) -> dict[str, Path]:
    """sweep.json (every run, the best rates, per-mixer statistics at them), sweep.csv (the
    runs at the best rates) and sweep.md (both tables), over ``lrs`` and ``mixers`` (default:
    every rate folder and every mixer found)."""
    out_dir = Path(out_dir)
    sweep = collect_sweep(out_dir, lrs, mixers)
    if not any(sweep.values()):
        raise FileNotFoundError(f"{out_dir} holds no lr*/{{mixer}}_s{{seed}} run with a metrics.jsonl")
    best = best_lrs(sweep, mixers)
    at_best = [r for m, lr in best.items() if lr is not None for r in sweep[lr] if r["mixer"] == m]
    paths = {"json": out_dir / "sweep.json", "csv": out_dir / "sweep.csv", "md": out_dir / "sweep.md"}
    write_json_atomic(paths["json"], {"best_lr": best, "mixers": summarise_lm(at_best),
                                      "runs": {f"{lr:g}": rows for lr, rows in sweep.items()}})
    write_csv_atomic(paths["csv"], list(dict.fromkeys(k for r in at_best for k in r)), at_best)
    write_text_atomic(paths["md"], format_sweep_markdown(sweep, best, at_best))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixerzoo.evals.lm_summary", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="the OUT folder of scripts/lm_compare.sh (or of scripts/lm_sweep.sh)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="OUT holds lr*/ folders: write sweep.{json,csv,md}")
    mode.add_argument("--best-lrs", action="store_true",
                      help="print 'mixer lr' for each mixer whose sweep is complete (the others to stderr)")
    parser.add_argument("--lrs", default=None, help="with --sweep / --best-lrs: only these rates (e.g. '3e-4 1e-3')")
    parser.add_argument("--mixers", default=None, help="with --sweep / --best-lrs: only these mixers")
    args = parser.parse_args(argv)
    lrs = mixers = None
    if args.lrs is not None:
        try:
            lrs = [float(v) for v in args.lrs.replace(",", " ").split()]
        except ValueError:
            parser.error(f"--lrs must be numbers separated by spaces or commas, got {args.lrs!r}")
    if args.mixers is not None:
        mixers = args.mixers.replace(",", " ").split()
    if args.best_lrs:
        folders = sweep_folders(args.out_dir, lrs)
        for mixer, lr in best_lrs(collect_sweep(args.out_dir, lrs, mixers), mixers).items():
            if lr is None:
                print(f"{mixer}: the sweep has no finished (or diverged) seed-0 run at every rate yet, "
                      "or every rate diverged", file=sys.stderr)
            else:
                print(f"{mixer} {folders[lr].name[2:]}")  # the rate as its folder spells it
        return 0
    paths = write_sweep(args.out_dir, lrs, mixers) if args.sweep else write_summary(args.out_dir)
    print(paths["md"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
