"""The LM trainer: build → (resume) → train_step / validate / save → close.

One process per device; under ``torchrun`` each rank runs this same code on its slice of the
global batch. Batches are a pure function of the step (``PackedSequences.batch``), so a
resumed run reads the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.build import no_decay_names, weight_decay_groups
from ..models.io import CheckpointError
from . import checkpoint as ckpt_io
from . import distributed as dist_util
from .config import ConfigError, TrainConfig
from .metrics import MetricsLog


class TrainingError(RuntimeError):
    """Training cannot go on as configured; the message says what to change."""


def lr_factor(step: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """The schedule as a factor on the peak rate at 1-based ``step``: linear warmup to 1 over
    ``warmup_steps``, then cosine to ``min_lr_ratio`` at ``steps``."""
    if step <= warmup_steps:
        return step / max(warmup_steps, 1)
    progress = min(1.0, (step - warmup_steps) / max(steps - warmup_steps, 1))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``lr · min_lr_ratio``."""
    return cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 (autocast over fp32 weights) on a GPU and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision: on only for ``bf16`` (``bf16-true`` has bf16 weights)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prepare_model(model: nn.Module, cfg: TrainConfig, precision: str, device: torch.device) -> nn.Module:
    """Move the model to its device and dtype and switch on the memory options of ``cfg``."""
    model.to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    if cfg.checkpoint_activations:
        model.set_activation_checkpointing(True)
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    no_decay: set[str] | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only. ``no_decay`` (default
    :func:`no_decay_names` of ``model``) must be taken before FSDP wraps the model: its
    parameters lose their marks there, and the groups are then matched by name."""
    groups = weight_decay_groups(model, cfg.weight_decay, no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=device.type == "cuda")


def forward_backward(model: nn.Module, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Next-token loss of ``x [B, T]`` (the chunked loss: no ``[B, T, V]`` logits), then its
    backward scaled by ``scale``; returns the unscaled loss, detached."""
    loss = model(input_ids=x, labels=x, return_logits=False).loss
    (loss * scale).backward()
    return loss.detach()


def optimizer_step(params, optimizer: torch.optim.Optimizer, grad_clip: float):
    """Clip (when ``grad_clip > 0``), step and clear the gradients; returns the norm or None."""
    norm = None
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIXERZOO_CACHE", Path.home() / ".cache" / "mixerzoo")) / "tokens"


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        if not cfg.data:
            raise ConfigError("data is required: a text file or folder, a .jsonl / .parquet file, or hf:NAME[:CONFIG]")
        if not cfg.out:
            raise ConfigError("out is required: the folder for checkpoints, metrics and plots")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self._check_run_dir(resume)
        self.d = dist_util.setup(cfg.device, cfg.fsdp)
        self.precision = resolve_precision(cfg.precision, self.d.device)
        torch.manual_seed(cfg.seed)
        self._build_data()
        self._build_model()
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_s = 0.0
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.log = MetricsLog(self.run_dir, enabled=self.d.is_main, tensorboard=cfg.tensorboard,
                              truncate_after=self.step)

    # --- setup -------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"out={str(self.run_dir)!r} is a file; pass a folder")
        self.resume_from = None
        if resume:
            self.resume_from = ckpt_io.latest_checkpoint(self.run_dir)
            if self.resume_from is None:
                raise CheckpointError(f"--resume {self.run_dir}: no checkpoint there yet ('latest' is missing); "
                                      "start the run without --resume")
            saved = ckpt_io.read_state(self.resume_from)
            changed = self.cfg.identity_changes(saved["config"])
            if changed:
                lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ConfigError(f"--resume {self.run_dir}: the run was started with other settings ({lines}); "
                                  "a resumed run must keep the model, data and schedule; start a new --out instead")
        elif (self.run_dir / "latest").exists():
            raise ConfigError(f"out={str(self.run_dir)!r} already holds a run; continue it with --resume "
                              f"{self.run_dir} or choose another --out")

    def _build_data(self) -> None:
        from ..data import PackedSequences, tokenize_corpus
        from ..data.tokenizers import load_tokenizer, token_byte_lengths

        cfg, d = self.cfg, self.d
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        cache = Path(cfg.data_cache) if cfg.data_cache else default_cache_dir()
        # Rank 0 tokenises; the others wait, then find the finished cache.
        if d.is_main:
            corpus = tokenize_corpus(cfg.data, self.tokenizer, cache, text_field=cfg.text_field,
                                     progress=cfg.progress)
        d.barrier()
        if not d.is_main:
            corpus = tokenize_corpus(cfg.data, self.tokenizer, cache, text_field=cfg.text_field, progress=False)
        self.corpus = corpus
        kw = dict(val_fraction=cfg.val_fraction, seed=cfg.seed, split_seed=cfg.split_seed)
        self.train_data = PackedSequences(corpus, cfg.seq_len, split="train", **kw)
        self.val_data = PackedSequences(corpus, cfg.seq_len, split="val", **kw) if cfg.val_fraction > 0 else None
        self.token_bytes = torch.as_tensor(token_byte_lengths(self.tokenizer), dtype=torch.float64)

        world = d.world_size
        if cfg.batch_size % world:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the world size {world}; "
                              f"use a multiple of {world}")
        per_rank = cfg.batch_size // world
        self.micro = cfg.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise ConfigError(f"micro_batch_size={self.micro} does not divide the per-rank batch {per_rank} "
                              f"(batch_size {cfg.batch_size} / world size {world})")
        self.accum = per_rank // self.micro

    def _build_model(self) -> None:
        from .. import build_model

        cfg = self.cfg
        vocab = cfg.vocab_size or len(self.tokenizer)
        if vocab < len(self.tokenizer):
            raise ConfigError(f"vocab_size={vocab} is smaller than the tokenizer's {len(self.tokenizer)} tokens: "
                              f"token ids up to {len(self.tokenizer) - 1} would fall outside the model; "
                              "leave vocab_size unset to take the tokenizer's")
        # a resumed run keeps the kernels it was built with (saved before the field: the fused ones)
        kernels = None if self.resume_from is None else \
            json.loads((self.resume_from / "config.json").read_text()).get("kernels", "fused")
        model = build_model(cfg.mixer, cfg.size, vocab_size=vocab, mixer_options=cfg.mixer_options,
                            tie_embeddings=cfg.tie_embeddings, kernels=kernels)
        if self.resume_from is not None:
            ckpt_io.load_model_weights(self.resume_from, model)
        self.raw = prepare_model(model, cfg, self.precision, self.d.device)
        no_decay = no_decay_names(model)
        self.model = dist_util.wrap(model, self.d, cfg.fsdp)
        # FSDP replaces the parameters: the optimizer takes them after wrapping.
        self.optimizer = build_optimizer(self.raw, cfg, self.d.device, no_decay)

    def _load_state(self, ckpt: Path) -> None:
        state = ckpt_io.read_state(ckpt)
        if state.get("data_fingerprint") != self.corpus.fingerprint:
            raise ConfigError(f"--resume {self.run_dir}: the data or tokenizer changed since the run was "
                              "started (their fingerprint differs); resume with the same files, or start a new --out")
        ckpt_io.load_optimizer(ckpt, self.raw, self.optimizer, state, self.d)
        ckpt_io.load_rng(ckpt, self.d)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed_s = state["elapsed_s"]

    # --- the step ----------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.precision, self.d.device)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step (all micro-steps); returns the global mean loss and grad norm,
        still on the device (read at log time, so there is no sync per step)."""
        cfg, d = self.cfg, self.d
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        start = (step - 1) * cfg.batch_size
        total = torch.zeros((), device=d.device)
        for m in range(self.accum):
            # micro-step m of every rank covers one contiguous slice of the global batch
            x = self.train_data.batch(start + m * self.micro * d.world_size, self.micro * d.world_size,
                                      rank=d.rank, world_size=d.world_size).to(d.device, non_blocking=True)
            with dist_util.grad_sync(self.model, m == self.accum - 1), self._autocast():
                total += forward_backward(self.model, x, 1.0 / self.accum) / self.accum
        norm = optimizer_step(self.raw.parameters(), self.optimizer, cfg.grad_clip)
        return dist_util.all_reduce_mean(total, d), norm

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Mean validation loss (nats per token) and bits per byte over the first
        ``val_batches · batch_size`` validation sequences (the same set whatever the
        micro-batch or world size)."""
        if self.val_data is None:
            return None
        d, per = self.d, self.micro * self.d.world_size
        n = min(len(self.val_data), self.cfg.val_batches * self.cfg.batch_size) // d.world_size * d.world_size
        if n == 0:
            return None
        self.model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=d.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=d.device)
        ntok = torch.zeros((), dtype=torch.float64, device=d.device)
        token_bytes = self.token_bytes.to(d.device)
        for start in range(0, n, per):
            count = min(per, n - start)
            x = self.val_data.batch(start, count, rank=d.rank, world_size=d.world_size).to(d.device)
            with self._autocast():
                # the chunked loss: a validation batch never holds its [B, T, V] logits either
                loss = self.model(input_ids=x, labels=x, return_logits=False).loss
            n_pred = x.shape[0] * (x.shape[1] - 1)
            nll += loss.double() * n_pred
            nbytes += token_bytes[x[:, 1:]].sum()
            ntok += n_pred
        self.model.train()
        nll, nbytes, ntok = (dist_util.all_reduce_sum(t, d) for t in (nll, nbytes, ntok))
        return {"val_loss": (nll / ntok).item(), "val_bpb": (nll / math.log(2) / nbytes.clamp_min(1)).item(),
                "val_tokens": int(ntok.item())}

    def wall_s(self) -> float:
        """Wall-clock seconds of the run so far, earlier (resumed) segments included."""
        return self.elapsed_s + time.perf_counter() - self._t0

    def save(self) -> Path:
        state = {"config": json.loads(json.dumps(self.cfg.to_dict())), "data_fingerprint": self.corpus.fingerprint,
                 "tokens_seen": self.tokens_seen, "elapsed_s": self.wall_s()}
        return ckpt_io.save_checkpoint(self.run_dir, self.step, self.raw, self.optimizer, self.tokenizer,
                                       state, self.d, self.cfg.keep_checkpoints)

    # --- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        tokens_per_step = cfg.batch_size * cfg.seq_len
        self._t0 = time.perf_counter()
        bar = _progress(cfg, d, self.step)
        pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        last_val = None
        self.model.train()
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                loss, norm = self.train_step(step)
                self.step, self.tokens_seen = step, self.tokens_seen + tokens_per_step
                pending.append((step, loss, norm))
                if step % cfg.log_every == 0 or step == cfg.steps:
                    if d.device.type == "cuda":
                        torch.cuda.synchronize(d.device)
                    now = time.perf_counter()
                    tok_s = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, self.tokens_seen
                    last = self._flush(pending, tok_s)
                    pending = []
                    if not math.isfinite(last):
                        raise TrainingError(f"the loss became {last} at step {step}; lower --lr, raise "
                                            "--warmup-steps or keep --grad-clip on; the last checkpoint is intact")
                    if bar is not None:
                        bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{tok_s:,.0f}")
                    elif d.is_main:  # no bar (logs, torchrun): one line per log step
                        print(f"step {step}/{cfg.steps} loss {last:.4f} lr {lr_at(step, cfg):.2e} "
                              f"{tok_s:,.0f} tok/s{_memory(d)}", flush=True)
                if step % cfg.val_every == 0 or step == cfg.steps:
                    last_val = self.validate()
                    if last_val is not None and d.is_main:
                        self.log.val(step, last_val)
                        (bar.write if bar is not None else print)(f"step {step}: val loss {last_val['val_loss']:.4f}, "
                                      f"{last_val['val_bpb']:.4f} bits/byte")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self.save()
                if step % cfg.val_every == 0 or step % cfg.save_every == 0:
                    # validation and saving are not training time: restart the tokens/s clock
                    if d.device.type == "cuda":
                        torch.cuda.synchronize(d.device)
                    t_last, tok_last = time.perf_counter(), self.tokens_seen
                if bar is not None:
                    bar.update(1)
        except torch.OutOfMemoryError as e:
            raise TrainingError(
                f"out of GPU memory at step {self.step + 1} with micro_batch_size={self.micro}, "
                f"seq_len={cfg.seq_len}: lower --micro-batch-size (the global batch stays the same through "
                "gradient accumulation), shorten --seq-len, or shard with --fsdp; the last checkpoint is intact"
            ) from e
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
        return {"step": self.step, "tokens": self.tokens_seen, "val": last_val, "wall_s": self.wall_s(),
                "checkpoint": str(ckpt_io.latest_checkpoint(self.run_dir)) if d.is_main else None}

    def _flush(self, pending, tok_s: float) -> float:
        values = torch.stack([loss for _, loss, _ in pending]).tolist()
        norms = [None if n is None else float(n) for _, _, n in pending]
        peak = (torch.cuda.max_memory_allocated(self.d.device) / 2**30) if self.d.device.type == "cuda" else None
        for (step, _, _), loss, norm in zip(pending, values, norms):
            self.log.train(step, {"loss": loss, "lr": lr_at(step, self.cfg), "grad_norm": norm,
                                  "tokens": self.tokens_seen - (self.step - step) * self.cfg.batch_size * self.cfg.seq_len,
                                  "tok_per_s": tok_s, "peak_mem_gib": peak})
        self.log.flush()
        return values[-1]

    def close(self) -> None:
        dist_util.teardown()


def _memory(d) -> str:
    if d.device.type != "cuda":
        return ""
    return f", peak {torch.cuda.max_memory_allocated(d.device) / 2**30:.1f} GiB"


def _progress(cfg: TrainConfig, d, start: int):
    if not (cfg.progress and d.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.mixer} {cfg.size}", unit="step",
                dynamic_ncols=True)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume=True`` continue) the training that ``cfg`` describes."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.close()
