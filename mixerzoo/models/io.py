"""Loading saved models with errors that say what is wrong, never a half-random model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import (
    CheckpointError,  # raised by the config reader too; importable from here
)

__all__ = ["CheckpointError", "load_model", "resolve_checkpoint"]


def load_model(path: str | Path, **kwargs: Any):
    """``MixerZooForCausalLM.from_pretrained(path)`` that refuses corrupt or partial checkpoints.

    ``path`` is a checkpoint folder (``save_pretrained`` output) or a training run folder (the
    ``--out`` of ``mixerzoo train``: its newest checkpoint), as ``mixerzoo eval --model`` takes.
    transformers fills weights missing from a checkpoint with fresh random ones and only logs a
    warning; here any missing or unexpected key is an error.
    """
    from .hf import MixerZooForCausalLM

    path = Path(path)
    if (path / "latest").is_file():
        path = resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the folder written by save_pretrained")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json; is this a save_pretrained folder?")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(meta, dict) or meta.get("model_type") != "mixerzoo":
        got = meta.get("model_type") if isinstance(meta, dict) else None
        raise CheckpointError(f"{cfg}: model_type is {got!r}, not 'mixerzoo'; this is not a mixerzoo "
                              "checkpoint (load it with the library that wrote it)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no weight files (model.safetensors); the save did not finish")
    for w in weights:
        _check_safetensors(w)
    try:
        model, info = MixerZooForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors / json / shape errors all mean the same to the user
        raise CheckpointError(f"{path}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"{path}: checkpoint does not match its config: {bad}")
    return model


def _check_safetensors(path: Path) -> None:
    """Read the header of a weights file, so that a truncated or foreign file is named."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                              "the checkpoint is corrupt or was cut short") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """The model folder that ``path`` names: a checkpoint folder itself (it holds
    ``config.json``), or a training run folder, whose ``latest`` file names its newest
    checkpoint under ``checkpoints/``."""
    path = Path(path)
    latest = path / "latest"
    if (path / "config.json").is_file() and not latest.is_file():
        return path
    if latest.is_file():
        name = latest.read_text().strip()
        ckpt = path / "checkpoints" / name
        if not (ckpt / "config.json").is_file():
            raise CheckpointError(f"{latest} names {name!r}, but {ckpt} holds no config.json; "
                                  "the run folder is damaged: point at a checkpoint folder directly")
        return ckpt
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(f"{path}: neither a checkpoint folder (config.json) nor a training run "
                          "(a 'latest' file); pass the --out folder of `mixerzoo train` or a checkpoint in it")
