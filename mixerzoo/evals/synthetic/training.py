"""Training and evaluating one model on a synthetic task: the schedule, early stopping,
masked accuracy and the loop itself."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mixerzoo.models.build import weight_decay_groups
from mixerzoo.tasks import IGNORE_INDEX, SyntheticTask

from .config import SyntheticRunConfig


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
        weight_decay_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas,
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


def _width(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("d_model", "hidden_size"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None
