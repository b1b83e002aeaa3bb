"""The LM comparison's table: every mixer's runs over seeds, mean and spread.

Reads what ``scripts/lm_compare.sh`` leaves in its output folder: ``{mixer}_s{seed}/`` (a
``mixerzoo train`` run: ``train_config.json``, ``metrics.jsonl``) and ``eval_{mixer}_s{seed}/``
(lm-eval's ``results_*.json``, the newest one counts). A run that stopped before its configured
step count is listed as unfinished and left out of the means, so a table never mixes budgets.

    python -m mixerzoo.evals.lm_summary results/lm_compare     # summary.{json,csv,md}
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from mixerzoo.files import write_csv_atomic, write_json_atomic, write_text_atomic
from mixerzoo.train.config import saved_split_seed
from mixerzoo.train.metrics import compare_runs, read_metrics

_RUN = re.compile(r"^(?P<mixer>.+)_s(?P<seed>\d+)$")
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
        rows.append({"mixer": m["mixer"], "seed": int(m["seed"]), "run": run.name, "target_steps": target,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixerzoo.evals.lm_summary", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="the OUT folder of scripts/lm_compare.sh")
    args = parser.parse_args(argv)
    paths = write_summary(args.out_dir)
    print(paths["md"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
