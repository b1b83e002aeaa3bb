"""The public entry point: validate, pick a backend, run it."""

from __future__ import annotations

import os

import torch

from .chunked import chunked_log_linear_attn
from .naive import naive_log_linear_attn
from .state import TRITON_HEAD_DIMS, LogLinearState, check_finite_values, check_inputs, lam_as_4d

__all__ = ["BACKENDS", "log_linear_attn", "resolve_backend"]

BACKENDS = ("auto", "torch", "naive", "triton")


def triton_available(device: torch.device) -> bool:
    """True where the Triton kernels can run: a CUDA device, or any device under the
    interpreter (TRITON_INTERPRET=1, used by the CPU tests)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    dims: tuple[int, int] | None = None,
) -> str:
    """The backend ``log_linear_attn`` runs for this request (one rule, used by the mixers too).

    ``"auto"`` is the Triton kernel on CUDA and the chunked torch code elsewhere; what the
    kernels do not take (fp64 inputs, head sizes ``dims = (K, V)`` outside 16/32/64/128) goes
    to torch, which computes the same function. An explicit backend is returned as is, or
    refused with the reason.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    unsupported = None
    if dtype == torch.float64:
        unsupported = "fp64 inputs"
    elif dims is not None and not all(d in TRITON_HEAD_DIMS for d in dims):
        unsupported = f"head sizes K, V = {dims} (it takes {TRITON_HEAD_DIMS})"
    if backend == "auto":
        if device.type == "cuda" and triton_available(device) and unsupported is None:
            return "triton"
        return "torch"
    if backend == "triton" and unsupported is not None:
        raise NotImplementedError(
            f"the Triton backend does not take {unsupported} yet; use backend='torch' or 'auto'"
        )
    return backend


def log_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    scale: float = 1.0,
    initial_state: LogLinearState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, LogLinearState | None]:
    """Log-linear attention (see ``naive.py`` for the definition).

    Args:
        q, k: ``[B, T, G, K]``, ``G`` dividing ``H``: value head ``h`` uses q/k group
            ``h // (H // G)`` (as Mamba-2's ``ngroups``).
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decay (<= 0), fp32 preferred.
        lam: ``[B, T, H, L]`` or broadcastable to it (e.g. ``[1, 1, H, L]``); levels above
            ``L − 1`` reuse level ``L − 1``.
        scale: multiplies every ``q · k``.
        initial_state: a :class:`LogLinearState` from an earlier call, or None.
        output_final_state: return the state after these tokens too.
        backend: ``"auto"``, ``"torch"`` (chunked, O(T log T)), ``"naive"`` (O(T²)) or
            ``"triton"``.
        cu_seqlens: for variable-length batches, as in fla: ``B = 1`` and the sequences packed
            along T, sequence ``i`` at ``[cu_seqlens[i], cu_seqlens[i+1])``; each starts at
            position 0 (its own Fenwick levels) and sees none of the others. Stateless calls
            only; each sequence is one pass of the chosen backend.
        v_scale: ``[B, T, H]`` or None. When given, the values are ``v · v_scale[..., None]``
            (formed in fp32, kept in v's dtype; Mamba-2's ``x · dt``). The stateless Triton path
            forms them inside its autograd Function and again in backward, so the product is
            never kept for backward; gradients reach both v and v_scale.
        check_finite: also check the values, not only shapes, dtypes and devices: refuse
            (ValueError naming the tensor and its first bad index) a NaN or ±inf in q, k, v,
            λ, v_scale or the initial state, ``g > 0`` or NaN, and ``λ < 0``. This reads every
            input, so it costs a device sync; off by default, where only the metadata checks
            run and values are taken as they are.

    Non-finite values and causality:
        ``g = -inf`` is a full reset: tokens from it on see nothing before it, and their
        outputs equal those of a fresh start (the state after it too). The torch and naive
        backends compute it so (``check_finite`` lets it through there); the Triton kernels
        do not (their outputs from the reset on are NaN), so with ``check_finite=True`` a
        resolved Triton backend refuses it. A reset does not clean a NaN/inf that came before it.

        Every backend's forward is causal for non-finite inputs too: a NaN/inf at position
        ``s`` in q, k, v, g or λ makes only the outputs at ``t >= s`` non-finite (in the heads
        and, for v, the value columns it reaches); earlier outputs are unchanged. The Triton
        forward masks its in-chunk product with a select and carries a non-finite value as
        NaN, so its ``t >= s`` outputs are NaN where the exact sum would give ±inf. This holds
        for the outputs only: on every backend the gradients reaching earlier tokens can
        still turn NaN (a backward product meets the non-finite input even where its forward
        weight was masked), so check the inputs you train on.

    Returns:
        ``(o, state)``: o ``[B, T, H, V]`` in v's dtype (fp32 accumulation, fp64 for fp64
        inputs); state a :class:`LogLinearState` when ``output_final_state`` else None.
    """
    check_inputs(q, k, v, g, lam, scale, initial_state)
    stateful = initial_state is not None or output_final_state
    name = resolve_backend(backend, q.device, dtype=q.dtype, dims=(q.shape[-1], v.shape[-1]))
    if v_scale is not None and v_scale.shape != v.shape[:3]:
        raise ValueError(f"v_scale must be [B, T, H] = {list(v.shape[:3])}, got {list(v_scale.shape)}")
    if check_finite:
        # Resets (g = -inf) are a fresh start only where the torch code computes them.
        check_finite_values(q, k, v, g, lam, allow_reset=name in ("torch", "naive"),
                            v_scale=v_scale, initial_state=initial_state)
    if v_scale is not None:
        if name == "triton" and not stateful and cu_seqlens is None and triton_available(q.device):
            from .triton_ops import triton_log_linear_attn

            return triton_log_linear_attn(q, k, v, g, lam, scale, v_scale=v_scale), None
        from ..pointwise import mul_dt

        v = mul_dt(v, v_scale)
    if cu_seqlens is not None:
        return _varlen(q, k, v, g, lam, scale, cu_seqlens, stateful, name), None
    args = (q, k, v, g, lam, scale, initial_state, output_final_state)
    if name == "torch":
        return chunked_log_linear_attn(*args)
    if name == "naive":
        return naive_log_linear_attn(*args)
    if not triton_available(q.device):
        raise RuntimeError(
            f"the Triton backend needs a CUDA device (inputs are on {q.device}) and triton "
            "installed; use backend='torch'"
        )
    if stateful:
        from .triton_state import triton_log_linear_attn_stateful

        return triton_log_linear_attn_stateful(*args)
    from .triton_ops import triton_log_linear_attn

    return triton_log_linear_attn(q, k, v, g, lam, scale), None


def _check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise TypeError("cu_seqlens must be a 1-D integer tensor [N + 1]")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B = {B}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0, end at T = {T} and never decrease; got {bounds[:8]}"
            + ("..." if len(bounds) > 8 else "")
        )
    return bounds


def _varlen(q, k, v, g, lam, scale, cu_seqlens, stateful, name) -> torch.Tensor:
    """Packed sequences, each from position 0 with no state: one backend call per sequence."""
    if stateful:
        raise NotImplementedError(
            "cu_seqlens with initial_state / output_final_state is not supported; "
            "run the sequences one by one to carry states"
        )
    bounds = _check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    lam4 = lam_as_4d(lam)
    outs = []
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        piece = slice(start, end)
        lam_i = lam4[:, piece] if lam4.shape[1] != 1 else lam4
        outs.append(log_linear_attn(q[:, piece], k[:, piece], v[:, piece], g[:, piece], lam_i,
                                    scale=scale, backend=name)[0])
    return torch.cat(outs, dim=1)
