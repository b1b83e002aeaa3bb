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
run), ``summary.csv`` (one row per mixer and point of the sweep) and ``accuracy.png``. They
are rewritten after every run (``"complete": false`` until the sweep ends), so a sweep that is
stopped part-way keeps the runs it finished.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mixerzoo.files import check_out_dir, write_json_atomic
from mixerzoo.tasks import IGNORE_INDEX, SyntheticTask, build_task, get_task_class

X_AXES = ("seq_len", "d_model")
PRECISIONS = ("fp32", "bf16")


@dataclass(kw_only=True)
class SyntheticRunConfig:
    """What to sweep and how to train; unknown keys are rejected.

    Fields:
        task: the task config; its ``seq_len`` is replaced by each entry of ``seq_lens``.
        mixers: registry names, or ``("all",)`` for every registered mixer.
        size: model size preset passed to ``build_model``; ``d_models`` / ``n_layers``
            override its width and depth (``None`` keeps the preset's).
        d_models, seq_lens: the grid; ``x_axis`` picks the plotted one, the other gives panels.
        task_overrides: per sequence length, task fields to change (e.g. Zoology scales the
            number of kv pairs with the length: ``{128: {"num_kv_pairs": 8}}``).
        mixer_options: per mixer name, extra options for its constructor.
        model_options: extra keywords for ``build_model`` (e.g. ``tie_embeddings``).
        learning_rates, seeds: every run is repeated for each; the best lr is kept per seed.
        max_steps, batch_size, warmup_frac, weight_decay, grad_clip, betas: optimisation.
        eval_every, eval_batches, eval_batch_size, eval_seed: the held-out evaluation.
        early_stop: stop a run once eval accuracy reaches this (Zoology-style 0.99).
        time_limit_s: per-run wall-clock cap on training after the first step, which
            compiles kernels (``None``: none); hitting it is recorded.
        device: "auto" or None (CUDA when present), "cpu", "cuda", "cuda:1", ...
        precision: "fp32", or "bf16" autocast on the forward pass.
        out_dir: where results are written (``None``: nothing written).
        progress: show a tqdm bar over all runs.
    """

    task: SyntheticTask = field(default_factory=lambda: build_task("mqar"))
    mixers: tuple[str, ...] = ("all",)
    size: str = "tiny"
    d_models: tuple[int | None, ...] = (None,)
    n_layers: int | None = None
    seq_lens: tuple[int, ...] = ()
    x_axis: str = "seq_len"
    task_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    learning_rates: tuple[float, ...] = (1e-3,)
    seeds: tuple[int, ...] = (0,)
    max_steps: int = 1000
    batch_size: int = 64
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eval_every: int = 50
    eval_batches: int = 4
    eval_batch_size: int = 256
    eval_seed: int = 987_654_321
    early_stop: float = 0.99
    time_limit_s: float | None = None
    device: str | None = "auto"
    precision: str = "fp32"
    out_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.task, str):
            self.task = build_task(self.task)
        if not isinstance(self.task, SyntheticTask):
            raise TypeError(f"task must be a task name or config, got {type(self.task).__name__}")
        if isinstance(self.mixers, str):
            self.mixers = (self.mixers,)
        for name in ("mixers", "d_models", "seq_lens", "learning_rates", "seeds", "betas"):
            setattr(self, name, tuple(getattr(self, name)))
        if not self.seq_lens:
            self.seq_lens = (self.task.seq_len,)
        if not self.mixers:
            raise ValueError("mixers is empty: name at least one mixer, or 'all'")
        if not self.d_models:
            raise ValueError("d_models is empty: give widths, or (None,) for the size's own")
        if self.x_axis not in X_AXES:
            raise ValueError(f"x_axis must be one of {X_AXES}, got {self.x_axis!r}")
        if self.x_axis == "d_model" and None in self.d_models:
            raise ValueError("x_axis='d_model' needs explicit widths in d_models")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.learning_rates or any(not lr > 0 for lr in self.learning_rates):
            raise ValueError(f"learning_rates must be positive, got {self.learning_rates}")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if self.eval_seed in self.seeds:
            raise ValueError(
                f"eval_seed={self.eval_seed} is also a training seed: the held-out set would be "
                "the first training batches; pick another eval_seed"
            )
        for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0.0 < self.early_stop <= 1.0:
            raise ValueError(f"early_stop must be in (0, 1], got {self.early_stop}")
        # Build every task variant now, so that a bad length fails before any training.
        for seq_len in self.seq_lens:
            self.task_for(seq_len)
        unknown = set(self.task_overrides) - set(self.seq_lens)
        if unknown:
            raise ValueError(f"task_overrides for lengths not in seq_lens: {sorted(unknown)}")

    def task_for(self, seq_len: int) -> SyntheticTask:
        """The task at one sweep length, with its per-length overrides applied."""
        return self.task.replace(seq_len=seq_len, **self.task_overrides.get(seq_len, {}))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["task"] = self.task.to_dict()
        out["task_overrides"] = {str(k): v for k, v in self.task_overrides.items()}
        return _jsonable(out)


# ---------------------------------------------------------------------------------------------
# Small pieces with their own tests: schedule, early stopping, accuracy, lr selection.


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warmup from ``1/warmup`` to 1, then cosine decay to 0 at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EarlyStopper:
    """Tracks eval accuracy over a run; ``update`` says whether to stop.

    Stops at the first evaluation with accuracy ``>= threshold``; remembers the best one.
    """

    threshold: float
    best_acc: float = float("-inf")
    best_step: int = -1
    last_acc: float = float("nan")
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, acc: float) -> bool:
        self.history.append((step, acc))
        self.last_acc = acc
        if acc > self.best_acc:
            self.best_acc, self.best_step = acc, step
        return acc >= self.threshold


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(correct, total)`` over the labelled positions; logits ``[B, T, V]``, labels ``[B, T]``."""
    mask = labels != IGNORE_INDEX
    pred = logits.argmax(dim=-1)
    return int((pred[mask] == labels[mask]).sum()), int(mask.sum())


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
            }
        )
    # Mixers in the order they were run (the order the caller asked for), then the grid.
    order = {m: i for i, m in enumerate(dict.fromkeys(r["mixer"] for r in runs))}
    rows.sort(key=lambda r: (order[r["mixer"]], r["seq_len"], r["d_model"] or 0))
    return rows


def _group_key(run: dict[str, Any]) -> tuple:
    return (run["mixer"], run["seq_len"], run["d_model"])


# ---------------------------------------------------------------------------------------------
# Training one model.


def resolve_device(device: str | None) -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else the CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Matrices (projections, embeddings) are decayed; gains, biases and per-head scalars
    # (norm weights, A_log, dt_bias, λ tables) are not, as in GPT/Mamba training recipes.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    eval_set: list[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "fp32",
) -> float:
    """Per-token accuracy at the labelled positions over a list of ``(inputs, labels)``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, labels in eval_set:
        with _autocast(inputs.device, precision):
            logits = model(inputs).logits
        c, t = masked_accuracy(logits, labels)
        correct, total = correct + c, total + t
    model.train(was_training)
    return correct / max(total, 1)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_one(
    model: torch.nn.Module,
    task: SyntheticTask,
    eval_set: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: SyntheticRunConfig,
    *,
    lr: float,
    seed: int,
    device: torch.device,
    on_eval: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (already on ``device``) on ``task``; returns the run's record.

    ``stop_reason`` is "threshold" (eval accuracy reached ``cfg.early_stop``), "max_steps",
    "time_limit" or "diverged" (a non-finite loss at an evaluation step).
    """
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas,
        foreach=device.type == "cuda",
    )
    warmup = int(cfg.warmup_frac * cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.max_steps, warmup)
    )
    stream = task.build(seed, device)
    stopper = EarlyStopper(cfg.early_stop)
    stop_reason, step, last_loss = "max_steps", 0, float("nan")
    start = time.perf_counter()
    first_step_s = 0.0
    model.train()
    for step in range(1, cfg.max_steps + 1):
        inputs, labels = stream.sample(cfg.batch_size)
        with _autocast(device, cfg.precision):
            logits = model(inputs).logits
        mask = labels != IGNORE_INDEX
        # Only the answer positions carry loss; selecting them first keeps the fp32 upcast
        # of the logits small.
        loss = F.cross_entropy(logits[mask].float(), labels[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if step == 1:
            # The first step compiles and autotunes kernels (a minute for some GPU paths); the
            # time cap counts training from the end of it, so slow compilers are not cut short.
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_step_s = time.perf_counter() - start
        over_time = (cfg.time_limit_s is not None and step > 1
                     and time.perf_counter() - start - first_step_s > cfg.time_limit_s)
        if step % cfg.eval_every == 0 or step == cfg.max_steps or over_time:
            # The loss is read (a device sync) only here, at evaluation steps.
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                stop_reason = "diverged"
                break
            acc = evaluate(model, eval_set, cfg.precision)
            if on_eval is not None:
                on_eval(step, acc)
            if stopper.update(step, acc):
                stop_reason = "threshold"
                break
            if over_time:
                stop_reason = "time_limit"
                break
    if not stopper.history:  # diverged before the first evaluation
        stopper.update(step, evaluate(model, eval_set, cfg.precision))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "steps": step,
        "stop_reason": stop_reason,
        "final_acc": stopper.last_acc,
        "best_acc": stopper.best_acc,
        "best_step": stopper.best_step,
        "final_loss": last_loss,
        "time_s": time.perf_counter() - start,
        "first_step_s": first_step_s,
        "history": [{"step": s, "acc": a} for s, a in stopper.history],
    }


def _build(mixer: str, cfg: SyntheticRunConfig, task: SyntheticTask, d_model: int | None):
    from mixerzoo import build_model  # the model package imports heavy things; defer it

    kwargs: dict[str, Any] = dict(cfg.model_options)
    if d_model is not None:
        kwargs["d_model"] = d_model
    if cfg.n_layers is not None:
        kwargs["n_layers"] = cfg.n_layers
    if cfg.mixer_options.get(mixer):
        kwargs["mixer_options"] = dict(cfg.mixer_options[mixer])
    # No max_seq_len: every built-in mixer handles any length (RoPE, no learned positions).
    return build_model(mixer, size=cfg.size, vocab_size=task.vocab_size, **kwargs)


def _non_embedding(model: torch.nn.Module) -> int:
    from mixerzoo.models.build import count_non_embedding

    return count_non_embedding(model)


def resolve_mixers(mixers: tuple[str, ...]) -> list[str]:
    """Expand ``"all"`` into every registered mixer, keeping order and dropping repeats;
    an unknown name fails here, before any training starts."""
    from mixerzoo.registry import get_mixer_spec, list_mixers

    names: list[str] = []
    for name in mixers:
        if name == "all":
            names.extend(list_mixers())
        else:
            get_mixer_spec(name)  # raises with the known names and a suggestion
            names.append(name)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# The sweep.


def run_synthetic(config: SyntheticRunConfig) -> dict[str, Any]:
    """Run the sweep; returns ``{"config", "environment", "complete", "runs", "summary",
    "param_spread", "files"}`` and writes the files when ``config.out_dir`` is set.

    Every run record holds: mixer, seq_len, d_model, x, seed, lr, steps, stop_reason,
    final_acc, best_acc, best_step, final_loss, time_s, first_step_s (compilation included),
    params (non-embedding), params_total, selected (best lr of its group), history (eval step and accuracy).
    """
    from tqdm.auto import tqdm

    cfg = config
    if cfg.out_dir is not None:
        check_out_dir(cfg.out_dir)
    device = resolve_device(cfg.device)
    mixers = resolve_mixers(cfg.mixers)
    grid = [(L, d) for L in cfg.seq_lens for d in cfg.d_models]
    total = len(grid) * len(mixers) * len(cfg.seeds) * len(cfg.learning_rates)
    runs: list[dict[str, Any]] = []
    eval_sets: dict[int, list] = {}
    bar = tqdm(total=total, desc=f"synth {cfg.task.name}", unit="run", disable=not cfg.progress)
    try:
        for seq_len, d_model in grid:
            task = cfg.task_for(seq_len)
            if seq_len not in eval_sets:
                # One fixed held-out set per length, shared by every mixer, seed and lr.
                eval_sets[seq_len] = task.build(cfg.eval_seed, device).batches(
                    cfg.eval_batches, cfg.eval_batch_size
                )
            for mixer in mixers:
                for seed in cfg.seeds:
                    for lr in cfg.learning_rates:
                        # Same init for every lr of a seed; the caller's RNG is left untouched.
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            model = _build(mixer, cfg, task, d_model)
                        model = model.to(device)
                        x = seq_len if cfg.x_axis == "seq_len" else d_model
                        tag = {"mixer": mixer, cfg.x_axis: x, "seed": seed, "lr": f"{lr:.0e}"}

                        def on_eval(step: int, acc: float, tag=tag) -> None:
                            bar.set_postfix({**tag, "step": step, "acc": f"{acc:.3f}"},
                                            refresh=False)
                            _throttled_refresh(bar)

                        record = train_one(
                            model, task, eval_sets[seq_len], cfg,
                            lr=lr, seed=seed, device=device, on_eval=on_eval,
                        )
                        runs.append(
                            {
                                "mixer": mixer,
                                "seq_len": seq_len,
                                "d_model": d_model if d_model is not None else _width(model),
                                "x": x if x is not None else _width(model),
                                "seed": seed,
                                "lr": lr,
                                # the size's matched count: embeddings and LM head excluded
                                "params": _non_embedding(model),
                                "params_total": model.num_parameters(),
                                "task": task.to_dict(),
                                **record,
                            }
                        )
                        bar.set_postfix({**tag, "acc": f"{record['best_acc']:.3f}"},
                                        refresh=False)
                        bar.update(1)
                        del model
                        if cfg.out_dir is not None and len(runs) < total:
                            _write_partial(cfg, device, mixers, runs)
    finally:
        bar.close()

    results = _collect(cfg, device, mixers, runs, complete=True)
    if cfg.out_dir is not None:
        results["files"] = write_results(results, cfg.out_dir)
    return results


def _write_partial(cfg: SyntheticRunConfig, device: torch.device, mixers: list[str],
                   runs: list[dict[str, Any]]) -> None:
    """Save the finished runs, so that a sweep stopped part-way (killed, out of time) keeps
    them; a failure to save is reported and the sweep goes on."""
    try:
        write_results(_collect(cfg, device, mixers, runs, complete=False), cfg.out_dir)
    except (OSError, ValueError, RuntimeError) as e:
        warnings.warn(f"could not save the partial results to {cfg.out_dir}: {e}", stacklevel=2)


def _collect(cfg: SyntheticRunConfig, device: torch.device, mixers: list[str],
             runs: list[dict[str, Any]], *, complete: bool) -> dict[str, Any]:
    select_best_lr(runs)
    return {
        "config": {**cfg.to_dict(), "mixers": mixers, "device": str(device)},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "complete": complete,
        "runs": runs,
        "summary": summarise(runs),
        "param_spread": param_spread(runs),
        "files": {},
    }


def _throttled_refresh(bar: Any, every_s: float = 0.5) -> None:
    # Evaluations can come many times a second on small models; redraw at most every
    # ``every_s`` so that logs captured from a non-terminal stay readable.
    now = time.monotonic()
    if now - getattr(bar, "_last_redraw", 0.0) >= every_s:
        bar._last_redraw = now
        bar.refresh()


def param_spread(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per ``"<seq_len>x<d_model>"``: (max − min) / min of the mixers' non-embedding counts."""
    groups: dict[str, list[int]] = {}
    for run in runs:
        groups.setdefault(f"{run['seq_len']}x{run['d_model']}", []).append(run["params"])
    return {k: (max(v) - min(v)) / min(v) for k, v in groups.items() if min(v) > 0}


def _width(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("d_model", "hidden_size"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


# ---------------------------------------------------------------------------------------------
# Output: files and a printed table.

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
    _write_csv(files["runs_csv"], RUN_COLUMNS, results["runs"])
    _write_csv(files["summary_csv"], SUMMARY_COLUMNS, results["summary"])
    config = results["config"]
    plot_summary(
        results["summary"],
        files["plot"],
        x_axis=config["x_axis"],
        title=f"{config['task']['task']}: accuracy (best lr, mean ± std over seeds)",
    )
    write_json_atomic(files["json"], _jsonable(results))
    return files


def _write_csv(path: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
            )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    return obj


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


def _compact(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# Presets.

PRESETS = ("demo", "quick", "full")


def _task_defaults(preset_name: str, task: str) -> tuple[dict[str, Any], dict[int, dict]]:
    """Task fields and per-length overrides of a preset: each task owns its own."""
    return get_task_class(task).preset_fields(preset_name)


# Two-layer, 64-wide models learn recall within a few hundred steps only when token
# identities stand out in the residual stream: with the GPT-2 init (embeddings at std 0.02,
# tied head) even softmax attention sat at chance (copying a random context value) for the
# whole demo budget; std-1 embeddings with an untied head learn. Same for every mixer, and
# the head is an embedding-sized matrix, so non-embedding parameters stay matched.
SMALL_MODEL_OPTIONS = {"tie_embeddings": False, "embedding_init_std": 1.0}


def preset(
    name: str,
    task: str | SyntheticTask = "mqar",
    *,
    task_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> SyntheticRunConfig:
    """A ready sweep, by name:

    - ``"demo"``: all six mixers, d_model 64, 2 layers, MQAR with 64 tokens and 4 kv pairs,
      two lrs, one seed, on the CPU; about five minutes on two cores.
    - ``"quick"``: lengths 64/128/256 (4/8/16 kv pairs, vocabulary 1024), two lrs, one seed,
      up to 2000 steps per run; minutes on a GPU.
    - ``"full"``: Zoology's Figure 2 grid: vocabulary 8192, lengths 64–512 with 4–64 kv
      pairs, widths 64/128/256, four lrs, three seeds, up to 10k steps at batch 256 (864 runs
      for six mixers: GPU hours; early stopping cuts most of them short).

    ``task`` is a task name or config; ``task_options`` change task fields; any other keyword
    replaces a :class:`SyntheticRunConfig` field (``mixers=("softmax",)``, ``device="cuda"``).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    task_options = dict(task_options or {})
    if isinstance(task, str):
        fields, per_length = _task_defaults(name, task)
        task_cfg = build_task(task, **{**fields, **task_options})
    else:  # a config given by the caller is used as it is
        task_cfg, per_length = (task.replace(**task_options) if task_options else task), {}
    if name == "demo":
        # Twelve runs (six mixers × two lrs); a run that does not reach 99% is cut at 600
        # steps or 30 s, so the whole demo stays around five minutes on two CPU cores.
        base: dict[str, Any] = dict(
            mixers=("all",), size="tiny", d_models=(64,), n_layers=2, seq_lens=(64,),
            learning_rates=(1e-3, 3e-3), seeds=(0,), max_steps=600, batch_size=64,
            eval_every=50, eval_batches=2, eval_batch_size=128, device="cpu",
            time_limit_s=30.0, model_options=dict(SMALL_MODEL_OPTIONS),
        )
    elif name == "quick":
        base = dict(
            mixers=("all",), size="tiny", d_models=(64,), n_layers=2, seq_lens=(64, 128, 256),
            learning_rates=(1e-3, 3e-3), seeds=(0,), max_steps=2000, batch_size=64,
            eval_every=100, eval_batches=4, eval_batch_size=256, model_options=dict(SMALL_MODEL_OPTIONS),
        )
    else:
        base = dict(
            mixers=("all",), size="tiny", d_models=(64, 128, 256), n_layers=2,
            seq_lens=(64, 128, 256, 512), x_axis="d_model",
            # Zoology's sweep: np.logspace(-4, -2, 4).
            learning_rates=tuple(10 ** (-4 + 2 * i / 3) for i in range(4)),
            seeds=(0, 1, 2), max_steps=10_000, batch_size=256, eval_every=250,
            eval_batches=8, eval_batch_size=256,
        )
    base["task"] = task_cfg
    # Per-length task fields apply to the lengths swept, and never override a field the
    # caller set through task_options.
    seq_lens = overrides.get("seq_lens", base["seq_lens"])
    base["task_overrides"] = {
        L: {k: v for k, v in fields.items() if k not in task_options}
        for L, fields in per_length.items()
        if L in seq_lens
    }
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SyntheticRunConfig)}
    if unknown:
        raise TypeError(f"unknown SyntheticRunConfig fields: {sorted(unknown)}")
    return SyntheticRunConfig(**{**base, **overrides})
