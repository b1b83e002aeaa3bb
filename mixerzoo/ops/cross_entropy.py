"""Cross-entropy of a linear head, fused so that the ``[N, V]`` logits never exist whole.

The plain language-model loss ``F.cross_entropy(F.linear(h, W).float(), targets)`` holds the
logits in the compute dtype, an fp32 copy, the fp32 softmax and the fp32 gradient at once: at
32,768 tokens and a 32,000-token vocabulary that is over 12 GB. ``linear_cross_entropy``
computes the same loss a chunk of rows at a time and, while a chunk's logits are still in
memory, turns them into their gradient and folds that into ``dh`` and ``dW``. Backward is then a
multiplication by the incoming scalar gradient, so nothing of size ``N × V`` is kept.

Per chunk of rows ``c``::

    logits_c = h_c @ W^T                                   # [n, V], compute dtype
    loss    += Σ_rows (logsumexp(logits_c) - logits_c[target])   # fp32
    logits_c = (softmax(logits_c) - onehot(target)) / n_valid    # in place; 0 on ignored rows
    dh_c     = logits_c @ W                                # [n, D]
    dW      += logits_c^T @ h_c                            # [V, D], fp32 accumulator

The middle two lines are one pass over the chunk, done by a Triton kernel on CUDA (tests force it under
``TRITON_INTERPRET=1``) or by torch ops elsewhere.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .fused import compute_dtype as matmul_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the torch backend computes the same loss
    triton = None

__all__ = ["BACKENDS", "linear_cross_entropy", "linear_cross_entropy_reference"]

BACKENDS = ("auto", "triton", "torch")

# One chunk's logits take about this many bytes in the compute dtype: large enough that the
# three matmuls per chunk keep a GPU busy, small next to the 12 GB the unfused loss needs.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_TOKENS = 1024

# On a GPU a 4096-wide tile streams a 32,000-entry row in 8 steps. The interpreter runs a tile
# as one numpy array, so small tiles cost nothing there and let the tiny vocabularies of the
# CPU tests span several tiles, as real vocabularies do on the GPU.
GPU_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 64


def linear_cross_entropy_reference(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The unfused loss: mean cross-entropy of ``F.linear(h, weight)`` over non-ignored rows.

    Args:
        h: ``[N, D]``; weight: ``[V, D]``; targets: ``[N]`` int64.
    Returns:
        fp32 scalar (nan when every target is ignored, as ``F.cross_entropy`` gives).
    """
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``linear_cross_entropy_reference`` without materialising the ``[N, V]`` logits.

    Args:
        h: ``[N, D]`` hidden states, fp32 or bf16 (fp16 too).
        weight: ``[V, D]`` the LM head or tied embedding, usually fp32.
        targets: ``[N]`` int64 in ``[0, V)``; rows equal to ``ignore_index`` are skipped.
        ignore_index: the target value of rows that take no part in the loss.
        chunk_tokens: rows per chunk; by default enough that one chunk's logits take about
            256 MiB in the compute dtype, at least 1024 rows and at most ``N``.
        backend: ``"auto"`` (Triton on CUDA or under the Triton interpreter, else torch),
            ``"triton"`` or ``"torch"``.

    Returns:
        The fp32 scalar mean cross-entropy over non-ignored rows. When every target is
        ignored it is 0.0 and the gradients are zero (``F.cross_entropy`` gives nan there,
        which a training step with a fully padded micro-batch should not see).

    The matmuls run in the autocast dtype when autocast is on for ``h``'s device (as
    ``F.linear`` would), else in ``h``'s dtype with ``weight`` cast to it; softmax statistics
    are always fp32. The gradients are computed during the forward whenever ``h`` or
    ``weight`` requires grad (and grad mode is on), and kept until backward: ``[N, D]`` in the
    compute dtype and ``[V, D]`` in fp32.
    """
    N, V = _check_inputs(h, weight, targets, ignore_index, chunk_tokens)
    compute_dtype = matmul_dtype(h)
    use_triton = _resolve_backend(backend, h.device, compute_dtype) == "triton"
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(N, V, compute_dtype)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_tokens, compute_dtype, use_triton)
    loss, _, _ = _fused_loss_and_grads(
        h, weight, targets, ignore_index, chunk_tokens, compute_dtype, use_triton, need_dh=False, need_dw=False
    )
    return loss


def default_chunk_tokens(N: int, V: int, compute_dtype: torch.dtype) -> int:
    """Rows per chunk: about ``CHUNK_BYTES`` of logits, at least 1024 rows, at most ``N``."""
    rows = max(MIN_CHUNK_TOKENS, CHUNK_BYTES // (V * compute_dtype.itemsize))
    return max(1, min(rows, N))


def _check_inputs(h, weight, targets, ignore_index, chunk_tokens) -> tuple[int, int]:
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a [N, D] tensor, got shape {_shape(h)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be [V, D] with D = {h.shape[1]} as in h, got shape {_shape(weight)}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (h.shape[0],):
        raise ValueError(f"targets must be [N] with N = {h.shape[0]} as in h, got shape {_shape(targets)}")
    if not h.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"h and weight must be floating point, got {h.dtype} and {weight.dtype}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    if not (h.device == weight.device == targets.device):
        devices = (h.device, weight.device, targets.device)
        raise ValueError(f"h, weight and targets must share a device, got {devices}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_tokens is not None and (
        not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1
    ):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    N, V = h.shape[0], weight.shape[0]
    if V == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    # One reduction and one host sync for the whole batch; the offending value is looked up
    # only once we know there is one.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"targets hold {value}, outside [0, {V}) and not ignore_index={ignore_index}"
        )
    return N, V


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _resolve_backend(backend: str, device: torch.device, compute_dtype: torch.dtype) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    why_not = _why_no_triton(device, compute_dtype)
    if backend == "auto":
        # the kernel on CUDA only: the interpreter is for tests that ask for it
        return "triton" if why_not is None and device.type == "cuda" else "torch"
    if why_not:
        raise RuntimeError(f"backend='triton' cannot run here: {why_not}; use backend='torch' or 'auto'")
    return "triton"


def _why_no_triton(device: torch.device, compute_dtype: torch.dtype) -> str | None:
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda" and not _KERNEL_INTERPRETED:
        return f"tensors are on {device.type}, and Triton needs CUDA (or TRITON_INTERPRET=1 set before it is imported)"
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the kernel takes fp32/bf16/fp16 logits, not {compute_dtype}"
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_tokens, compute_dtype, use_triton):
        loss, dh, dw = _fused_loss_and_grads(
            h, weight, targets, ignore_index, chunk_tokens, compute_dtype, use_triton,
            need_dh=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # Out of place, so that a second backward (retain_graph) starts from the same buffers
        gh = None if dh is None else (dh * grad_loss).to(h_dtype)
        gw = None if dw is None else (dw * grad_loss).to(w_dtype)
        return gh, gw, None, None, None, None, None


def _fused_loss_and_grads(
    h, weight, targets, ignore_index, chunk_tokens, compute_dtype, use_triton, *, need_dh, need_dw
):
    """Loss (fp32 scalar), ``dh`` ``[N, D]`` in the compute dtype and ``dW`` ``[V, D]`` fp32, both
    for a unit upstream gradient (None where not needed)."""
    N, V = h.shape[0], weight.shape[0]
    need_grad = need_dh or need_dw
    # Autocast would otherwise re-cast the fp32 dW accumulation below to the low precision
    with torch.autocast(h.device.type, enabled=False):
        hc = h.detach().to(compute_dtype)
        wc = weight.detach().to(compute_dtype)
        targets = targets.contiguous()
        # A device scalar, so that no chunk waits on the host; a batch with every row ignored
        # divides its zero sums by 1 instead of 0, giving a zero loss and zero gradients
        n_valid = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        scale = 1.0 / n_valid
        row_loss = torch.empty(N, dtype=torch.float32, device=h.device)
        dh = torch.empty_like(hc, memory_format=torch.contiguous_format) if need_dh else None
        dw = torch.zeros(V, h.shape[1], dtype=torch.float32, device=h.device) if need_dw else None
        buf = torch.empty(min(chunk_tokens, N), V, dtype=compute_dtype, device=h.device)
        step = _cross_entropy_rows_triton if use_triton else _cross_entropy_rows_torch
        for start in range(0, N, chunk_tokens):
            end = min(start + chunk_tokens, N)
            h_c = hc[start:end]
            logits = buf[: end - start]
            torch.mm(h_c, wc.t(), out=logits)
            step(logits, targets[start:end], row_loss[start:end], scale, ignore_index, write_grad=need_grad)
            if need_dh:
                torch.mm(logits, wc, out=dh[start:end])
            if need_dw:
                _accumulate_fp32(dw, logits.t(), h_c)
        loss = row_loss.sum() / n_valid
    return loss, dh, dw


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly of lower precision."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mm_has_fp32_out():
        # cuBLAS accumulates in fp32 anyway; taking its fp32 result skips a per-chunk rounding
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a, b))


@functools.cache
def _cuda_mm_has_fp32_out() -> bool:
    # ``out_dtype`` for low-precision matmuls is recent (torch 2.8+) and CUDA-only
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _cross_entropy_rows_torch(logits, targets, row_loss, scale, ignore_index, *, write_grad):
    """Per-row loss into ``row_loss`` ``[n]`` and, if ``write_grad``, the gradient of the mean
    loss written over ``logits`` ``[n, V]``."""
    x = logits.float()  # the same tensor when logits are fp32, so the gradient lands in place
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(x, dim=1)
    row_loss.copy_(torch.where(valid, lse - x.gather(1, safe).squeeze(1), 0.0))
    if not write_grad:
        return
    x.sub_(lse[:, None]).exp_()
    x.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=x.dtype))
    x.mul_(torch.where(valid, scale, 0.0)[:, None])
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)


def _block_v(V: int) -> int:
    cap = INTERPRETER_BLOCK_V if _KERNEL_INTERPRETED else GPU_BLOCK_V
    return min(cap, triton.next_power_of_2(V))


def _cross_entropy_rows_triton(logits, targets, row_loss, scale, ignore_index, *, write_grad, block_v=None):
    """As ``_cross_entropy_rows_torch``, one Triton program per row."""
    n, V = logits.shape
    if n == 0:
        return
    assert logits.is_contiguous() and targets.is_contiguous() and row_loss.is_contiguous()
    block_v = block_v or _block_v(V)
    # Triton launches on the current CUDA device, which need not be the tensors'
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _cross_entropy_rows_kernel[(n,)](
            logits, targets, row_loss, scale, V, ignore_index,
            WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )


if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits, targets, row_loss, scale, V, ignore_index,
        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # int64: a chunk of a 32,000-entry vocabulary passes 2^31 elements at 67,109 rows
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * V
        target = tl.load(targets + row)
        valid = target != ignore_index
        cols = tl.arange(0, BLOCK_V)

        # Online logsumexp over tiles; the first tile is peeled so that the running max starts
        # from a real logit (every row has at least one) rather than -inf, where
        # exp(-inf - -inf) would be nan
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        s = tl.sum(tl.exp(x - m), 0)
        for start in range(BLOCK_V, V, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)

        x_target = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(row_loss + row, tl.where(valid, lse - x_target, 0.0))

        if WRITE_GRAD:
            k = tl.where(valid, tl.load(scale), 0.0)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                g = tl.where(offs == target, p - 1.0, p) * k
                tl.store(base + offs, g.to(logits.dtype.element_ty), mask=mask)

    _KERNEL_INTERPRETED = type(_cross_entropy_rows_kernel).__name__ == "InterpretedFunction"
else:
    _KERNEL_INTERPRETED = False
