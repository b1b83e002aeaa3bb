"""A sweep's results: the best learning rate per seed, the summary over seeds, and the
files (JSON, CSV, plot) and printed table made from them."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mixerzoo.files import jsonable, write_csv_atomic, write_json_atomic


def select_best_lr(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark (``selected=True``) the run with the best accuracy per (mixer, seq_len, d_model,
    seed); ties go to the run that reached it at an earlier step, then to the smaller lr."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        run["selected"] = False
        groups.setdefault(_group_key(run) + (run["seed"],), []).append(run)
    for members in groups.values():
        best = max(members, key=lambda r: (r["best_acc"], -r["best_step"], -r["lr"]))
        best["selected"] = True
    return runs


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mixer, seq_len, d_model): best-lr accuracy, mean and std over seeds.

    ``acc_std`` is the sample standard deviation (0 with a single seed).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("selected"):
            groups.setdefault(_group_key(run), []).append(run)
    rows = []
    for (mixer, seq_len, d_model), members in groups.items():
        accs = [r["best_acc"] for r in members]
        rows.append(
            {
                "mixer": mixer,
                "seq_len": seq_len,
                "d_model": d_model,
                "x": members[0]["x"],
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "n_seeds": len(accs),
                "best_lrs": [r["lr"] for r in sorted(members, key=lambda r: r["seed"])],
                "params": members[0]["params"],
                "steps_mean": statistics.fmean(r["steps"] for r in members),
                **_length_summary(members),
            }
        )
    # Mixers in the order they were run (the order the caller asked for), then the grid.
    order = {m: i for i, m in enumerate(dict.fromkeys(r["mixer"] for r in runs))}
    rows.sort(key=lambda r: (order[r["mixer"]], r["seq_len"], r["d_model"] or 0))
    return rows


def _length_summary(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the final model's accuracy at each longer length."""
    lengths = sorted({int(L) for r in members for L in (r.get("length_acc") or {})})
    if not lengths:
        return {}
    mean, std = {}, {}
    for L in lengths:
        accs = [r["length_acc"][str(L)] for r in members if str(L) in (r.get("length_acc") or {})]
        mean[str(L)] = statistics.fmean(accs)
        std[str(L)] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"length_acc_mean": mean, "length_acc_std": std}


def _group_key(run: dict[str, Any]) -> tuple:
    return (run["mixer"], run["seq_len"], run["d_model"])


def param_spread(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per ``"<seq_len>x<d_model>"``: (max − min) / min of the mixers' non-embedding counts."""
    groups: dict[str, list[int]] = {}
    for run in runs:
        groups.setdefault(f"{run['seq_len']}x{run['d_model']}", []).append(run["params"])
    return {k: (max(v) - min(v)) / min(v) for k, v in groups.items() if min(v) > 0}


RUN_COLUMNS = (
    "mixer", "seq_len", "d_model", "x", "seed", "lr", "selected", "steps", "stop_reason",
    "final_acc", "best_acc", "best_step", "final_loss", "time_s", "first_step_s", "params", "params_total",
)


SUMMARY_COLUMNS = (
    "mixer", "seq_len", "d_model", "x", "acc_mean", "acc_std", "n_seeds", "best_lrs", "params",
    "steps_mean",
)


def write_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write results.json, results.csv, summary.csv and accuracy.png; returns their paths."""
    from mixerzoo.evals.plot import plot_summary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": str(out / "results.json"),
        "runs_csv": str(out / "results.csv"),
        "summary_csv": str(out / "summary.csv"),
        "plot": str(out / "accuracy.png"),
    }
    results["files"] = files
    write_csv_atomic(files["runs_csv"], RUN_COLUMNS, results["runs"])
    write_csv_atomic(files["summary_csv"], SUMMARY_COLUMNS, results["summary"])
    config = results["config"]
    plot_summary(
        results["summary"],
        files["plot"],
        x_axis=config["x_axis"],
        title=f"{config['task']['task']}: accuracy (best lr, mean ± std over seeds)",
    )
    rows = length_rows(results["summary"])
    if rows:
        files["length_csv"], files["length_plot"] = str(out / "length.csv"), str(out / "length.png")
        write_csv_atomic(files["length_csv"], LENGTH_COLUMNS, rows)
        plot_summary([{**r, "seq_len": r["test_len"], "d_model": f"T={r['seq_len']}, d={r['d_model']}"} for r in rows],
                     files["length_plot"], x_axis="seq_len", panel_title="trained at {value}",
                     title=f"{config['task']['task']}: length generalisation (mean ± std over seeds)")
    write_json_atomic(files["json"], jsonable(results))
    return files


LENGTH_COLUMNS = ("mixer", "seq_len", "d_model", "test_len", "acc_mean", "acc_std", "n_seeds")


def length_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mixer, training length, width, test length), the training length first
    (its accuracy: the best during training)."""
    rows = []
    for r in summary:
        if not r.get("length_acc_mean"):
            continue
        base = {"mixer": r["mixer"], "seq_len": r["seq_len"], "d_model": r["d_model"], "n_seeds": r["n_seeds"]}
        rows.append({**base, "test_len": r["seq_len"], "acc_mean": r["acc_mean"], "acc_std": r["acc_std"]})
        for L, acc in sorted(r["length_acc_mean"].items(), key=lambda kv: int(kv[0])):
            rows.append({**base, "test_len": int(L), "acc_mean": acc, "acc_std": r["length_acc_std"][L]})
    return rows


def format_table(results: dict[str, Any]) -> str:
    """The summary as a text table: a row per mixer, a column per x value, a block per panel."""
    summary = results["summary"]
    config = results["config"]
    x_axis = config["x_axis"]
    panel_key = "d_model" if x_axis == "seq_len" else "seq_len"
    label = {"seq_len": "T", "d_model": "d"}
    mixers = list(dict.fromkeys(r["mixer"] for r in summary))
    blocks = []
    for panel in sorted({r[panel_key] for r in summary}, key=lambda v: (v is None, v)):
        rows = [r for r in summary if r[panel_key] == panel]
        xs = sorted({r["x"] for r in rows})
        cell = {(r["mixer"], r["x"]): r for r in rows}
        header = ["mixer", "params"] + [f"{label[x_axis]}={x}" for x in xs]
        lines = []
        for mixer in mixers:
            found = [cell.get((mixer, x)) for x in xs]
            if not any(found):
                continue
            params = {r["params"] for r in found if r}
            one = len(params) == 1
            # Along a width sweep the count changes per column: it goes into each cell.
            lines.append(
                [mixer, f"{next(iter(params)):,}" if one else "per cell"]
                + [
                    f"{r['acc_mean']:.3f}±{r['acc_std']:.3f}"
                    + ("" if one else f" ({_compact(r['params'])})")
                    if r else "-"
                    for r in found
                ]
            )
        widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        title = (
            f"{config['task']['task']} accuracy (best lr; mean±std over {len(config['seeds'])} "
            f"seed{'s' if len(config['seeds']) > 1 else ''}), {label[panel_key]}={panel}"
        )
        body = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
        body += [fmt.format(*row) for row in lines]
        blocks.append("\n".join([title, *body]))
    blocks += _length_blocks(summary)
    spread = results.get("param_spread") or {}
    if spread and len(mixers) > 1:
        blocks.append(
            f"non-embedding parameters differ across mixers by at most {max(spread.values()):.2%}"
        )
    runs = results.get("runs") or []
    capped = [r for r in runs if r.get("stop_reason") == "time_limit"]
    if capped:
        # the cap is wall-clock: on a busy machine the same runs get fewer steps
        blocks.append(
            f"{len(capped)} of {len(runs)} runs were stopped by the {config['time_limit_s']:g} s "
            f"time cap before {config['max_steps']} steps (fewest: {min(r['steps'] for r in capped)}); "
            "their accuracies come from shortened training and fall when the machine is busy. "
            "Use --time-limit 0 for no cap."
        )
    return "\n\n".join(blocks)


def _length_blocks(summary: list[dict[str, Any]]) -> list[str]:
    """Length generalisation: per training length and width, accuracy at each test length."""
    blocks = []
    for (T, d) in dict.fromkeys((r["seq_len"], r["d_model"]) for r in summary if r.get("length_acc_mean")):
        rows = [r for r in summary if (r["seq_len"], r["d_model"]) == (T, d) and r.get("length_acc_mean")]
        lengths = sorted({int(L) for r in rows for L in r["length_acc_mean"]})
        header = ["mixer", f"T={T} (trained)"] + [f"T={L}" for L in lengths]
        lines = [[r["mixer"], f"{r['acc_mean']:.3f}±{r['acc_std']:.3f}"]
                 + [f"{r['length_acc_mean'][str(L)]:.3f}±{r['length_acc_std'][str(L)]:.3f}"
                    if str(L) in r["length_acc_mean"] else "-" for L in lengths] for r in rows]
        widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        body = [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*row) for row in lines]
        blocks.append("\n".join([f"length generalisation: trained at T={T}, d={d}; accuracy of the final "
                                  "model at longer T (the trained column: best during training)", *body]))
    return blocks


def _compact(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
