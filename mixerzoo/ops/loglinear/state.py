"""The data contract of log-linear attention: level arithmetic, the state, input checks.

Shared by every backend (naive, chunked, recurrent) so that they agree on the same things:
which level a (query, key) pair sits at, how λ levels beyond the table are reused, what a
state means, and which inputs are rejected.

Levels (0-based absolute positions): ``ℓ(t, t) = 0`` and ``ℓ(t, s) = bit_length(t XOR s)``
for ``s < t``. A λ table with ``L`` levels serves longer sequences by clamping the level
index to ``L - 1`` (the top level's λ is reused for the levels above it).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from ..common import accumulation_dtype as compute_dtype  # the op families' one rule

__all__ = ["LogLinearState", "num_levels", "bit_length", "compute_dtype", "check_inputs"]


# Head sizes the Triton kernels are compiled for (tile shapes must be powers of two >= 16).
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def num_levels(T: int) -> int:
    """Levels a sequence of ``T`` tokens (from position 0) uses: ``ceil(log2 T) + 1``."""
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"num_levels expects an integer T >= 1, got {T!r}")
    return (int(T) - 1).bit_length() + 1


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``int.bit_length`` of a non-negative integer tensor (0 -> 0).

    ``frexp`` writes ``x = m * 2**e`` with ``0.5 <= m < 1``, so ``e`` is the bit length; exact
    for ``x < 2**53`` (float64 mantissa), far beyond any sequence length.
    """
    return torch.frexp(x.to(torch.float64)).exponent.to(torch.int64)


class LogLinearState(NamedTuple):
    """Fenwick level states after consuming the absolute positions ``[0, offset)``.

    ``levels``: ``[B, H, n, K, V]`` (fp32, or fp64 for fp64 inputs), ``n >= offset.bit_length()``.
    For each set bit ``j`` of ``offset`` (``e``), bucket ``j`` holds the keys ``s`` with
    ``bit_length(e XOR s) == j + 1``, i.e. ``s in [base_j, base_j + 2**j)`` where ``base_j`` is
    ``e`` with bits ``0..j`` cleared, as ``S_j = Σ_s exp(G[e-1] - G[s]) k_s v_sᵀ`` (decayed to the
    last consumed token). Buckets of clear bits, and levels beyond ``bit_length(e)``, are zero.
    With grouped keys (``G < H``), value head ``h`` uses the key of group ``h // (H // G)``.

    ``offset``: tokens consumed so far. Levels depend on absolute positions, so a state is
    only meaningful together with its offset.
    """

    levels: torch.Tensor
    offset: int

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        head_k: int,
        head_v: int,
        *,
        n: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "LogLinearState":
        """The empty state (offset 0), optionally with ``n`` preallocated zero levels."""
        levels = torch.zeros(batch, heads, n, head_k, head_v, device=device, dtype=dtype)
        return cls(levels, 0)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_state(state, B: int, H: int, K: int, V: int, device: torch.device) -> None:
    """Reject a state whose type, shape, offset or device does not fit the inputs."""
    if not isinstance(state, LogLinearState):
        raise TypeError(
            f"initial_state must be a LogLinearState (or None), got {type(state).__name__}"
        )
    levels, offset = state
    if not isinstance(levels, torch.Tensor) or not levels.is_floating_point():
        raise TypeError("initial_state.levels must be a floating-point tensor [B, H, n, K, V]")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"initial_state.offset must be an integer >= 0, got {offset!r}")
    if levels.dim() != 5 or (levels.shape[:2], levels.shape[3:]) != ((B, H), (K, V)):
        raise ValueError(
            f"initial_state.levels must be [B, H, n, K, V] = [{B}, {H}, n, {K}, {V}], "
            f"got {tuple(levels.shape)}"
        )
    need = int(offset).bit_length()
    if levels.shape[2] < need:
        raise ValueError(
            f"initial_state at offset {offset} needs n >= {need} levels, got n = {levels.shape[2]}"
        )
    if levels.device != device:
        raise ValueError(f"initial_state is on {levels.device}, the inputs on {device}")


def check_inputs(q, k, v, g, lam, scale, initial_state=None) -> tuple[int, int, int, int, int, int, int]:
    """Validate the inputs of ``log_linear_attn``; return ``(B, T, G, H, K, V, L)``.

    Expected: q, k ``[B, T, G, K]``; v ``[B, T, H, V]`` with ``G`` dividing ``H``; g ``[B, T, H]``;
    lam broadcastable to ``[B, T, H, L]`` with ``L >= 1``; all floating point, q/k/v of one dtype;
    ``T >= 1``; scale a real number; initial_state a :class:`LogLinearState` or None.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("lam", lam)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (fp32/bf16/fp16/fp64), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; use one device")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, G, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4:
        raise ValueError(f"v must be [B, T, H, V], got shape {tuple(v.shape)}")
    B, T, G, K = q.shape
    H, V = v.shape[2], v.shape[3]
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, H, V] with B, T = {B}, {T} (from q), got {tuple(v.shape)}")
    if T < 1:
        raise ValueError("sequence length T must be >= 1")
    if G < 1 or H % G != 0:
        raise ValueError(f"the number of q/k groups G = {G} must divide the value heads H = {H}")
    if g.shape != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = [{B}, {T}, {H}], got {tuple(g.shape)}")
    if lam.dim() < 1 or lam.dim() > 4 or lam.shape[-1] < 1:
        raise ValueError(f"lam must be [B, T, H, L] (L >= 1) or broadcastable to it, got {tuple(lam.shape)}")
    L = lam.shape[-1]
    try:
        torch.broadcast_shapes(lam.shape, (B, T, H, L))
    except RuntimeError:
        raise ValueError(
            f"lam of shape {tuple(lam.shape)} does not broadcast to [B, T, H, L] = [{B}, {T}, {H}, {L}]"
        ) from None
    if not _is_number(scale):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if initial_state is not None:
        check_state(initial_state, B, H, K, V, q.device)
    return B, T, G, H, K, V, L


def lam_as_4d(lam: torch.Tensor) -> torch.Tensor:
    """View a broadcastable λ as 4-D ``[B', T', H', L]`` (each of B', T', H' is 1 or full)."""
    return lam.reshape((1,) * (4 - lam.dim()) + tuple(lam.shape))


def _first_position(bad: torch.Tensor) -> list[int]:
    # nonzero() lists indices in row-major order, so its first row is the first bad element.
    return bad.nonzero()[0].tolist()


def check_finite_values(q, k, v, g, lam, *, allow_reset: bool, v_scale=None, initial_state=None) -> None:
    """Refuse non-finite values, ``g > 0`` and ``λ < 0`` (ValueError naming the tensor and its
    first bad index). Reads every value, so it syncs with the device; ``log_linear_attn`` runs
    it only when asked (``check_finite=True``).

    ``g = -inf`` (a full reset: nothing before it reaches the tokens from it on) passes when
    ``allow_reset``, i.e. on the backends that compute it as a fresh start.
    """
    named = [("q", q), ("k", k), ("v", v), ("lam", lam)]
    if v_scale is not None:
        named.append(("v_scale", v_scale))
    if initial_state is not None:
        named.append(("initial_state.levels", initial_state.levels))
    for name, x in named:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            pos = _first_position(bad)
            raise ValueError(f"{name} has a non-finite value ({x[tuple(pos)].item()}) at index {pos}")
    bad_lam = lam < 0
    if bool(bad_lam.any()):
        pos = _first_position(bad_lam)
        raise ValueError(f"lam must be >= 0, got {lam[tuple(pos)].item()} at index {pos}")
    if allow_reset:
        bad_g = torch.isnan(g) | (g > 0)
    else:
        bad_g = ~torch.isfinite(g) | (g > 0)
    if bool(bad_g.any()):
        pos = _first_position(bad_g)
        value = g[tuple(pos)].item()
        if value == float("-inf"):
            raise ValueError(
                f"g = -inf (a reset) at index {pos}: the Triton backend does not compute resets "
                "(its outputs from there on would be NaN); use backend='torch' or 'naive'"
            )
        raise ValueError(f"g must be a finite log-decay <= 0, got {value} at index {pos}")
