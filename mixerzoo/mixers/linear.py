"""Causal linear attention: feature-mapped q and k, no denominator, per-head output RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mixerzoo.mixers.base import Mixer, check_backend, pick_kernel_backend
from mixerzoo.ops.external import load_fla_chunk_linear_attn
from mixerzoo.ops.fused import check_kernels, compute_dtype
from mixerzoo.ops.linear_attn import (
    linear_attn_chunked,
    linear_attn_naive,
    linear_attn_step,
)

# elu + 1 keeps features positive (Katharopoulos et al. 2020), so q·k >= 0 like softmax scores.
FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "identity": lambda x: x,
}


class LinearAttention(Mixer):
    """Linear attention ``o_t = scale · Σ_{s<=t} (φ(q_t)·φ(k_s)) v_s`` per head.

    There is no normalising denominator (fla's ``normalize=False``); instead, with
    ``output_norm=True`` (the default, as in fla's LinearAttention layer) each head's output
    goes through an RMSNorm, which keeps the scale of the un-normalised sum in check.
    ``scale = head_dim ** -0.5`` on every backend. Decoding state: ``[B, H, K, V]`` in fp32.

    Backends: ``"auto"`` (fla's ``chunk_linear_attn`` on CUDA when fla imports, else torch),
    ``"triton"`` (fla, CUDA only), ``"torch"`` (chunked), ``"naive"`` (quadratic). ``kernels``
    picks the output norm's implementation (fused op or plain code).
    """

    accepts_kernels = True

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        head_dim: int = 64,
        feature_map: str = "elu",
        output_norm: bool = True,
        chunk_size: int = 64,
        backend: str = "auto",
        kernels: str = "fused",
    ):
        super().__init__(d_model, layer_idx=layer_idx)
        self.kernels = check_kernels(kernels)
        if head_dim < 1 or d_model % head_dim != 0:
            raise ValueError(f"d_model={d_model} must be divisible by head_dim={head_dim}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r} is not one of {sorted(FEATURE_MAPS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.backend = check_backend(backend, ("auto", "triton", "torch", "naive"))
        self.head_dim = head_dim
        self.num_heads = d_model // head_dim
        self.feature_map = feature_map
        self.chunk_size = chunk_size
        self.scale = head_dim**-0.5
        inner = self.num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.norm = nn.RMSNorm(head_dim, eps=1e-5) if output_norm else None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x ``[..., d]`` -> φ(q), φ(k), v ``[..., H, D]``."""
        phi = FEATURE_MAPS[self.feature_map]
        q = rearrange(self.q_proj(x), "... (h d) -> ... h d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "... (h d) -> ... h d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "... (h d) -> ... h d", d=self.head_dim)
        return phi(q), phi(k), v

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        """o ``[..., H, D]`` -> ``[..., d]``."""
        if self.norm is not None:
            if self.kernels == "fused":
                from mixerzoo.ops.norms import rms_norm

                o = rms_norm(o, self.norm.weight, self.norm.eps, out_dtype=compute_dtype(o))
            else:
                o = self.norm(o)
        return self.o_proj(rearrange(o, "... h d -> ... (h d)"))

    def _pick_backend(self, x: torch.Tensor) -> str:
        return pick_kernel_backend(self.backend, x, load_fla_chunk_linear_attn, "LinearAttention (fla)")

    def _sequence(self, q, k, v, initial_state, want_state):
        backend = self._pick_backend(q)
        if backend == "triton":
            kernel = load_fla_chunk_linear_attn()
            # fla defaults to scale = K**-0.5 and normalize=True: pass both so that every
            # backend computes the same function.
            o, final = kernel(
                q, k, v, scale=self.scale, initial_state=initial_state,
                output_final_state=want_state, normalize=False,
            )
            self._ran("fla")
        elif backend == "torch":
            o, final = linear_attn_chunked(
                q, k, v, scale=self.scale, initial_state=initial_state,
                output_final_state=want_state, chunk_size=self.chunk_size,
            )
            self._ran("torch")
        else:
            o, final = linear_attn_naive(q, k, v, scale=self.scale, initial_state=initial_state)
            self._ran("naive")
        return o, (final.float() if want_state else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = self._qkv(x)
        o, _ = self._sequence(q, k, v, None, False)
        return self._out(o.to(x.dtype))

    def init_state(self, batch: int, device, dtype) -> torch.Tensor:
        return torch.zeros(
            batch, self.num_heads, self.head_dim, self.head_dim, device=device, dtype=torch.float32
        )

    def prefill(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        q, k, v = self._qkv(x)
        o, state = self._sequence(q, k, v, state, True)
        return self._out(o.to(x.dtype)), state

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x_t [B, {self.d_model}], got {tuple(x_t.shape)}")
        q, k, v = self._qkv(x_t)
        o, state = linear_attn_step(q, k, v, state, scale=self.scale)
        return self._out(o.to(x_t.dtype)), state

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * self.head_dim
