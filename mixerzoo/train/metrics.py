"""What a training run writes as it goes: ``metrics.jsonl``, ``loss.png``, TensorBoard.

One JSON object per line: ``{"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s"}`` for
training steps and ``{"step", "val_loss", "val_bpb", "val_tokens"}`` for validations. A
resumed run first drops the lines past its checkpoint, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False, truncate_after: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        self._buffer: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(truncate_after)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=truncate_after + 1 if truncate_after else None)

    def _truncate(self, after: int) -> None:
        if not self.path.exists():
            return
        # what the resumed run re-logs is dropped, and so is a last line a kill cut short
        keep = [r for r in read_metrics(self.path) if after and r["step"] <= after]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def train(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            self._buffer.append({"step": step, **values})
            if self._tb is not None:
                for k, v in values.items():
                    if v is not None:
                        self._tb.add_scalar(f"train/{k}", v, step)

    def val(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._buffer.append({"step": step, **values})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"val/{k}", v, step)
        self.flush()
        self.plot()

    def flush(self) -> None:
        if not self.enabled or not self._buffer:
            return
        with open(self.path, "a") as f:
            for rec in self._buffer:
                f.write(json.dumps(rec) + "\n")
        self._buffer = []
        if self._tb is not None:
            self._tb.flush()

    def plot(self) -> None:
        if self.enabled and self.path.exists():
            plot_loss(read_metrics(self.path), self.plot_path)

    def close(self) -> None:
        self.flush()
        self.plot()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per line.

    A last line cut short (the process was killed while appending it: no newline after it) is
    left out with a warning; any other unreadable line is an error naming the file and line.
    """
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: its last line is cut short (a kill while it was written) and "
                              f"is left out: {line[:60]!r}", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {i}: not a JSON record ({e}); the file is damaged: "
                             "remove that line (later lines stay usable)") from e
    return records


def plot_loss(records: list[dict[str, Any]], out: str | Path, label: str | None = None) -> None:
    """Training loss (and validation loss where present) against step, into a PNG."""
    plot_runs({label or "": records}, out)


def near_best(final: dict[str, float], within: float = 0.05) -> set[str]:
    """The runs whose final loss is within ``within`` (relative) of the lowest one; a run whose
    loss is not finite (a diverged run) is never near the best."""
    finite = {label: v for label, v in final.items() if math.isfinite(v)}
    if not finite:
        return set()
    best = min(finite.values())
    return {label for label, v in finite.items() if v <= best + within * abs(best)}


def plot_runs(runs: dict[str, list[dict[str, Any]]], out: str | Path,
              title: str | None = None) -> dict[str, list[str]]:
    """Several runs' training (line) and validation (dots) losses on one plot, into a PNG.

    With validation losses, a second panel shows, over the second half of training, those of
    the runs that end within 5% of the best: mixers a few hundredths of a nat apart are
    indistinguishable at the full scale. Returns the labels drawn in each panel
    (``{"all": [...], "near_best": [...]}``); nothing is written when no run has a loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    curves = []
    for label, records in runs.items():
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train or val:
            curves.append((label, train, val))
    drawn: dict[str, list[str]] = {"all": [], "near_best": []}
    if not curves:
        return drawn
    n = len(curves)
    if n <= 10:
        colours = [f"C{i}" for i in range(n)]
    elif n <= 20:
        colours = list(plt.get_cmap("tab20").colors[:n])
    else:  # distinct colours for any number of runs (a qualitative map would repeat)
        colours = [plt.get_cmap("turbo")(x) for x in (i / (n - 1) for i in range(n))]
    has_train = any(train for _, train, _ in curves)
    has_val = any(val for _, _, val in curves)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(11 if has_val else 6.5, 4),
                             layout="constrained", squeeze=False)
    full = axes[0][0]
    last = max(step for _, train, val in curves for step, _ in train + val)
    close = near_best({label: val[-1][1] for label, _, val in curves if val})
    for (label, train, val), colour in zip(curves, colours, strict=True):
        drawn["all"].append(label)
        if train:
            full.plot(*zip(*train), lw=1, color=colour, alpha=0.8)
        if val:
            full.plot(*zip(*val), "o--", ms=3, color=colour)
            if label in close:
                late = [(s, v) for s, v in val if s >= last / 2] or val[-1:]
                axes[0][1].plot(*zip(*late), "o--", ms=3, color=colour)
                drawn["near_best"].append(label)
    full.set_xlabel("step")
    full.set_ylabel("loss (nats / token)")
    full.grid(alpha=0.3)
    if has_val:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("validation loss (nats / token)")
        axes[0][1].set_title("validation, second half: runs within 5% of the best", fontsize=9)
        axes[0][1].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    # one entry per run (its colour) and one per line style, not one per run and style
    handles = [Line2D([], [], color=c, lw=2, label=label) for (label, _, _), c in zip(curves, colours) if label]
    if has_train:
        handles.append(Line2D([], [], color="0.3", lw=1, label="train"))
    if has_val:
        handles.append(Line2D([], [], color="0.3", ls="--", marker="o", ms=3, label="validation"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    tmp = Path(out).with_name(Path(out).stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return drawn


def compare_runs(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each run's final losses, speed and memory, and its training-loss gap to the first run.

    The gap is |loss - loss_ref| / loss_ref over the steps both runs logged: its maximum, mean,
    and the mean over the last quarter of those steps (where curves have settled)."""
    if not runs:
        raise ValueError("compare_runs needs at least one run")
    ref_label, ref = next(iter(runs.items()))
    ref_loss = {r["step"]: r["loss"] for r in ref if "loss" in r}
    out: dict[str, Any] = {"reference": ref_label, "runs": {}}
    for label, records in runs.items():
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        if not train:
            raise ValueError(f"run {label!r} has no training-loss records")
        speeds = sorted(r["tok_per_s"] for r in train[len(train) // 10:] if r.get("tok_per_s"))
        row: dict[str, Any] = {
            "steps": train[-1]["step"], "final_loss": train[-1]["loss"],
            "final_val_loss": val[-1]["val_loss"] if val else None,
            "final_val_bpb": val[-1].get("val_bpb") if val else None,
            "median_tok_per_s": speeds[len(speeds) // 2] if speeds else None,
            "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0 for r in train), default=None),
        }
        common = [(r["loss"], ref_loss[r["step"]]) for r in train if r["step"] in ref_loss]
        if label != ref_label and common:
            gaps = [abs(a - b) / abs(b) for a, b in common]
            tail = gaps[len(gaps) * 3 // 4:]
            row.update(steps_compared=len(gaps), max_rel_gap=max(gaps), mean_rel_gap=sum(gaps) / len(gaps),
                       mean_rel_gap_last_quarter=sum(tail) / len(tail))
        out["runs"][label] = row
    return out
