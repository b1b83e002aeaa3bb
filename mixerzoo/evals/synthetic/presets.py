"""Named sweeps: ``preset("demo")`` and the others, ready :class:`SyntheticRunConfig`s."""

from __future__ import annotations

import dataclasses
from typing import Any

from mixerzoo.tasks import SyntheticTask, build_task, get_task_class

from .config import SyntheticRunConfig


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

    - ``"demo"``: every registered mixer, d_model 64, 2 layers, MQAR with 64 tokens and 4 kv pairs,
      two lrs, one seed, on the CPU; about five minutes on two cores.
    - ``"quick"``: lengths 64/128/256 (4/8/16 kv pairs, vocabulary 1024), two lrs, one seed,
      up to 2000 steps per run; minutes on a GPU.
    - ``"full"``: Zoology's Figure 2 grid: vocabulary 8192, lengths 64–512 with 4–64 kv
      pairs, widths 64/128/256, four lrs, three seeds, up to 10k steps at batch 256 (144 runs
      per mixer: GPU hours; early stopping cuts most of them short).

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
        # Two runs per mixer (two lrs); a run that does not reach 99% is cut at 600 steps or
        # 30 s, so the whole demo stays within minutes on two CPU cores.
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
