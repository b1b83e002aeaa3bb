"""Size presets and parameter matching across mixers.

A size fixes width, depth and vocabulary. Its parameter target is the non-embedding count of
the ``softmax`` model with a SwiGLU width of 8/3·d (GPT-3 / Llama convention); every other
mixer gets the SwiGLU width that brings its own non-embedding count within 1% of that target,
so mixers that spend more parameters in the mixer (an adaptive λ MLP, say) pay for them with a
narrower MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import RegistryError, accepted_options, construct_mixer

# Width step for solved MLP widths: multiples of 8 keep GPU matmuls aligned; a width that
# misses the 1% band at that step (only at tiny sizes) falls back to the exact integer.
MLP_MULTIPLE = 8
MATCH_TOLERANCE = 0.01


@dataclass(frozen=True)
class SizePreset:
    d_model: int
    n_layers: int
    # Mixer options applied at this size when the mixer accepts them and the user set none:
    # the `tiny` size shrinks heads and state so that CPU tests and demos stay fast.
    mixer_defaults: dict[str, Any] = field(default_factory=dict)


SIZES: dict[str, SizePreset] = {
    "tiny": SizePreset(64, 2, {"head_dim": 16, "d_state": 16, "lambda_hidden": 16}),
    "125m": SizePreset(768, 12),
    "350m": SizePreset(1024, 24),
    "760m": SizePreset(1536, 24),
    "1.3b": SizePreset(2048, 24),
}


def get_size(size: str) -> SizePreset:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    return SIZES[size]


def size_defaults(cls: type, preset: SizePreset, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed with the size's mixer defaults that ``cls`` names."""
    named, _ = accepted_options(cls)
    out = {k: v for k, v in preset.mixer_defaults.items() if k in named}
    out.update(options)
    return out


def softmax_mlp_width(d_model: int) -> int:
    """SwiGLU width of the reference softmax model: 8/3·d rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def construct_on_meta(cls: type, d_model: int, layer_idx: int, options: dict[str, Any], name: str | None = None):
    """One mixer layer built on the meta device (no memory, no init cost), where parameters
    are counted before any model is built; a constructor that needs real tensor values
    fails with its name and what to change, not with torch's message alone."""
    try:
        with torch.device("meta"):
            return construct_mixer(cls, d_model, layer_idx, options, name)
    except RegistryError:
        raise
    except ValueError as e:
        # the constructor refused an option value: its own message, tagged with the mixer
        raise RegistryError(f"mixer {name or cls.__name__!r} ({cls.__module__}.{cls.__name__}): {e}") from e
    except Exception as e:
        raise RegistryError(
            f"mixer {name or cls.__name__!r} ({cls.__module__}.{cls.__name__}) could not be built on the meta "
            f"device, where mixerzoo counts parameters before building a model: {type(e).__name__}: {e}. "
            "A constructor must not read tensor values (.item(), float(t), printing a tensor, data-dependent "
            "branches); compute such values from plain numbers, or in forward") from e


def mixer_param_count(cls: type, d_model: int, layer_idx: int, options: dict[str, Any], name: str | None = None) -> int:
    """Parameters of one mixer layer, counted on the meta device."""
    return sum(p.numel() for p in construct_on_meta(cls, d_model, layer_idx, options, name).parameters())


def block_extra_params(d_model: int, mlp_hidden: int) -> int:
    """Per-layer parameters outside the mixer: two RMSNorm weights and the SwiGLU MLP."""
    return 2 * d_model + 3 * d_model * mlp_hidden


def non_embedding_params(mixer_params: list[int], d_model: int, mlp_hidden: int) -> int:
    """Non-embedding count: every block plus the final norm (embeddings and LM head excluded)."""
    return sum(mixer_params) + len(mixer_params) * block_extra_params(d_model, mlp_hidden) + d_model


def solve_mlp_width(mixer_params: list[int], d_model: int, target: int, what: str = "model") -> int:
    """The SwiGLU width that puts the non-embedding count nearest ``target``."""
    n = len(mixer_params)
    fixed = non_embedding_params(mixer_params, d_model, 0)
    exact = (target - fixed) / (3 * d_model * n)
    if exact < 1:
        raise RegistryError(
            f"{what}: its mixers alone ({fixed:,} parameters) exceed the size's target "
            f"({target:,}); shrink the mixer's options (head_dim, d_state, expand, ...)"
        )
    width = max(MLP_MULTIPLE, MLP_MULTIPLE * round(exact / MLP_MULTIPLE))
    if abs(non_embedding_params(mixer_params, d_model, width) - target) > MATCH_TOLERANCE * target:
        width = max(1, round(exact))
    return width
