"""Training checkpoints: a transformers model folder plus the training state beside it.

Layout of a run folder::

    runs/a/
      latest                         name of the newest complete checkpoint
      checkpoints/step_00000500/     config.json, model.safetensors, tokenizer files
        trainer/state.json           step, config, data fingerprint, optimizer hyper-parameters
        trainer/optimizer.safetensors  AdamW moments and step counts, by parameter name
        trainer/rng_rank{r}.safetensors  every rank's RNG state

Every checkpoint is written into a temporary folder and renamed into place, and ``latest`` is
replaced atomically after that, so a crash mid-write leaves the previous checkpoint intact.
The state is full (unsharded) tensors, gathered with ``torch.distributed.checkpoint``'s
state-dict helpers, so a checkpoint written by N ranks, with DDP or FSDP, resumes on any
number of ranks. Nothing is unpickled on load: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..models.io import CheckpointError
from .distributed import Dist

STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _options(d: Dist) -> StateDictOptions:
    # Full tensors on CPU: a checkpoint then does not depend on how the run was sharded.
    return StateDictOptions(full_state_dict=True, cpu_offload=d.enabled)


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{fqn}/{key}"] = value.detach().cpu().contiguous()
    return tensors, osd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any,
    trainer_state: dict[str, Any], d: Dist, keep: int,
) -> Path:
    """Write checkpoint ``step`` of ``model`` (the unwrapped or FSDP-sharded module) on every
    rank's behalf; every rank must call it. Returns the checkpoint folder."""
    model_sd = get_model_state_dict(model, options=_options(d))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_options(d))
    root = run_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    d.barrier()
    try:
        rng = {"cpu": torch.get_rng_state()}
        if d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(d.device)
        save_file(rng, str(tmp / "trainer" / f"rng_rank{d.rank}.safetensors"))
        if d.is_main:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its per-shard bar would break the training bar
            model.save_pretrained(tmp, state_dict={k: v.contiguous() for k, v in model_sd.items()})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            tensors, groups = _flatten_optimizer(optim_sd)
            save_file(tensors, str(tmp / "trainer" / "optimizer.safetensors"))
            state = {**trainer_state, "version": STATE_VERSION, "step": step, "world_size": d.world_size,
                     "param_groups": groups}
            (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=2))
    except BaseException:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    d.barrier()
    if d.is_main:
        _sync_tree(tmp)
        if final.exists():  # a re-save of the same step: swap, so that one complete copy always exists
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(run_dir / "latest", final.name + "\n")
        _prune(root, keep)
    d.barrier()
    return final


def _sync_tree(path: Path) -> None:
    """fsync every file, so that the rename never publishes a folder whose data is still only
    in the page cache (a power cut would otherwise leave a complete-looking, empty checkpoint)."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None for a run that has saved none."""
    latest = run_dir / "latest"
    if not latest.is_file():
        return None
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    if not (ckpt / "trainer" / "state.json").is_file():
        raise CheckpointError(f"{latest} names {ckpt.name}, which is missing or incomplete; "
                              "delete the 'latest' file to start again, or point --resume at another run")
    return ckpt


def read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "trainer" / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e}); the checkpoint is corrupt") from e
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {state.get('version')!r}, "
                              f"this mixerzoo reads version {STATE_VERSION}")
    return state


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    """Load the checkpoint's weights into the (not yet wrapped) model; every key must match."""
    path = ckpt / "model.safetensors"
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); the checkpoint is corrupt") from e
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit this model ({e}); "
                              "was the run started with another mixer or size?") from e


def load_optimizer(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], d: Dist) -> None:
    path = ckpt / "trainer" / "optimizer.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the optimizer state ({type(e).__name__}: {e})") from e
    osd = _unflatten_optimizer(tensors, state["param_groups"])
    _init_optimizer_state(optimizer)
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (a step with zero gradients at lr 0, which
    leaves the parameters bit for bit unchanged), so that a full saved state can be
    distributed onto them; the loaded state then overwrites every value."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def load_rng(ckpt: Path, d: Dist) -> None:
    """Restore this rank's RNG; a run resumed on more ranks than it had seeds the new ones from
    rank 0's state, since nothing else is there to restore."""
    path = ckpt / "trainer" / f"rng_rank{d.rank}.safetensors"
    if not path.is_file():
        path = ckpt / "trainer" / "rng_rank0.safetensors"
    try:
        rng = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the RNG state ({type(e).__name__}: {e}); the checkpoint "
                              "is corrupt or was cut short: resume from an earlier checkpoint") from e
    torch.set_rng_state(rng["cpu"])
    if d.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], d.device)
