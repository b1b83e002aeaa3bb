"""Causal softmax attention with rotary positions, optional GQA and qk-norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from mixerzoo.mixers.base import Mixer
from mixerzoo.ops import pointwise
from mixerzoo.ops.fused import check_kernels


@dataclass
class KVCache:
    """Keys and values seen so far, ``[B, num_kv_heads, T, head_dim]`` each, after RoPE."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def position(self) -> int:
        """Number of tokens consumed: the absolute position of the next token."""
        return self.k.shape[2]


def apply_rope(x: torch.Tensor, start: int, base: float, kernels: str = "fused") -> torch.Tensor:
    """Rotary embedding (rotate-half layout) for x ``[B, H, T, D]`` at positions start..start+T-1,
    in fp32, returned in x's dtype; the fused op or its plain reference by ``kernels``."""
    if kernels == "fused":
        return pointwise.apply_rope(x, start, base)
    return pointwise.apply_rope_reference(x, start, base)


class SoftmaxAttention(Mixer):
    """Multi-head causal softmax attention (``F.scaled_dot_product_attention``).

    ``num_heads = d_model // head_dim``; ``num_kv_heads`` key/value heads are each shared by
    ``num_heads // num_kv_heads`` query heads (GQA). ``qk_norm`` applies a per-head RMSNorm to
    queries and keys before RoPE. Decoding keeps a :class:`KVCache`. ``kernels`` picks the
    rotary embedding's implementation (fused op or plain code).
    """

    accepts_kernels = True

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        head_dim: int = 64,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        rope_base: float = 10000.0,
        bias: bool = False,
        kernels: str = "fused",
    ):
        super().__init__(d_model, layer_idx=layer_idx)
        self.kernels = check_kernels(kernels)
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even and >= 2 for rotary embeddings, got {head_dim}")
        if d_model % head_dim != 0:
            raise ValueError(
                f"d_model={d_model} must be divisible by head_dim={head_dim}; choose a head_dim "
                "that divides d_model"
            )
        num_heads = d_model // head_dim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must be positive and divide num_heads={num_heads}"
            )
        if rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1, got {rope_base}")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.rope_base = float(rope_base)
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None

    def _qkv(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """Project x ``[B, T, d]`` to q ``[B, H, T, D]`` and k, v ``[B, Hkv, T, D]`` with RoPE."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, start, self.rope_base, self.kernels)
        k = apply_rope(k, start, self.rope_base, self.kernels)
        return q, k, v

    def _attend(self, q, k, v, mask=None, causal=False) -> torch.Tensor:
        """SDPA over q ``[B, H, Tq, D]`` and k, v ``[B, Hkv, Tk, D]`` -> ``[B, Tq, H*D]``."""
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = repeat(k, "b h t d -> b (h r) t d", r=rep)
            v = repeat(v, "b h t d -> b (h r) t d", r=rep)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return rearrange(o, "b h t d -> b t (h d)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = self._qkv(x, 0)
        self._ran("sdpa")
        return self.o_proj(self._attend(q, k, v, causal=True))

    def init_state(self, batch: int, device, dtype) -> KVCache:
        empty = torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(k=empty, v=empty.clone())

    def prefill(self, x: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        self.check_input(x)
        start, T = state.position, x.shape[1]
        q, k, v = self._qkv(x, start)
        k = torch.cat((state.k, k.to(state.k.dtype)), dim=2)
        v = torch.cat((state.v, v.to(state.v.dtype)), dim=2)
        if start == 0:
            o = self._attend(q, k.to(q.dtype), v.to(q.dtype), causal=True)
        else:
            # is_causal aligns the mask top-left when Tq != Tk; with a cache the queries sit at
            # the bottom right, so the mask is spelled out: key j is visible to query i iff
            # j <= start + i.
            key_pos = torch.arange(start + T, device=x.device)
            query_pos = torch.arange(start, start + T, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [T, start + T]
            o = self._attend(q, k.to(q.dtype), v.to(q.dtype), mask=mask)
        self._ran("sdpa")
        return self.o_proj(o), KVCache(k=k, v=v)

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x_t [B, {self.d_model}], got {tuple(x_t.shape)}")
        q, k, v = self._qkv(x_t[:, None], state.position)
        k = torch.cat((state.k, k.to(state.k.dtype)), dim=2)
        v = torch.cat((state.v, v.to(state.v.dtype)), dim=2)
        # A single query at the newest position sees every cached key: no mask needed.
        o = self._attend(q, k.to(q.dtype), v.to(q.dtype))
        return self.o_proj(o)[:, 0], KVCache(k=k, v=v)

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.num_kv_heads * self.head_dim
