"""What a synthetic sweep runs: :class:`SyntheticRunConfig`, and the names it resolves
(mixers, device) before any training starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from mixerzoo.files import jsonable
from mixerzoo.tasks import SyntheticTask, build_task

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
        eval_length_factors: after training, also evaluate each model on the task at
            ``seq_len × f`` for each factor (length generalisation; the task's other fields,
            such as the number of kv pairs, stay those of the training length).
        workers: runs at a time, each in its own process; with CUDA they are spread over the
            visible GPUs round-robin (several small runs share a GPU). 1: in this process.
        resume: with ``out_dir``, keep the finished runs found in its results.json whose
            settings equal this sweep's, and train only the others.
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
    eval_length_factors: tuple[int, ...] = ()
    workers: int = 1
    resume: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.task, str):
            self.task = build_task(self.task)
        if not isinstance(self.task, SyntheticTask):
            raise TypeError(f"task must be a task name or config, got {type(self.task).__name__}")
        if isinstance(self.mixers, str):
            self.mixers = (self.mixers,)
        for name in ("mixers", "d_models", "seq_lens", "learning_rates", "seeds", "betas", "eval_length_factors"):
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
        for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        bad = [f for f in self.eval_length_factors if not isinstance(f, int) or isinstance(f, bool) or f < 2]
        if bad:
            raise ValueError(f"eval_length_factors must be integers >= 2 (2 tests at twice the length), got {bad}")
        if not 0.0 < self.early_stop <= 1.0:
            raise ValueError(f"early_stop must be in (0, 1], got {self.early_stop}")
        # Build every task variant now, so that a bad length fails before any training.
        for seq_len in self.seq_lens:
            self.task_for(seq_len)
            for f in self.eval_length_factors:
                self.task_for(seq_len).replace(seq_len=seq_len * f)
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
        return jsonable(out)


def resolve_device(device: str | None) -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else the CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use 'cpu'")
    return dev


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
