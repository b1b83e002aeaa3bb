"""The Mamba-2 block: in_proj, short causal conv, SSD, gated RMSNorm, out_proj (Dao & Gu 2024).

The block is written so that a variant replaces only its sequence op: subclasses override
:meth:`Mamba2._sequence`, :meth:`Mamba2._sequence_step`, :meth:`Mamba2._init_seq_state` and
:meth:`Mamba2._seq_state_size`, and may widen ``in_proj`` with :meth:`Mamba2._widen_in_proj`
(its extra columns reach the sequence op as ``extra``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mixerzoo.mixers.base import Mixer, check_backend, pick_kernel_backend
from mixerzoo.ops.external import load_mamba_chunk_scan_combined
from mixerzoo.ops.fused import check_kernels, compute_dtype
from mixerzoo.ops.ssd import ssd_chunked, ssd_naive, ssd_step


@dataclass
class Mamba2State:
    """Decoding state: the last ``d_conv - 1`` conv inputs ``[B, conv_dim, d_conv - 1]`` and
    the sequence op's state (for Mamba-2 the SSM state ``[B, H, P, N]`` in fp32)."""

    conv: torch.Tensor
    seq: Any


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of ``group_size`` channels, gated by ``silu(z)``.

    ``norm_before_gate=False`` (Mamba-2's default) normalises ``y * silu(z)``; ``True``
    normalises y and then gates. Computed in fp32, returned in y's dtype. ``kernels`` picks the
    fused op or the plain code below (its reference).
    """

    def __init__(self, dim: int, group_size: int, norm_before_gate: bool, eps: float = 1e-5,
                 kernels: str = "fused"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.eps = eps
        self.kernels = check_kernels(kernels)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}, kernels={self.kernels}")

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.kernels == "fused":
            from mixerzoo.ops.norms import gated_rms_norm

            return gated_rms_norm(y, z, self.weight, group_size=self.group_size,
                                  norm_before_gate=self.norm_before_gate, eps=self.eps)
        yf, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            yf = yf * gate
        yg = rearrange(yf, "... (g d) -> ... g d", d=self.group_size)
        yg = yg * torch.rsqrt(yg.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        yf = rearrange(yg, "... g d -> ... (g d)") * self.weight.float()
        if self.norm_before_gate:
            yf = yf * gate
        return yf.to(y.dtype)

    def project(self, y: torch.Tensor, z: torch.Tensor, proj_weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(self(y, z), proj_weight)``, fused so that the norm output is not kept."""
        from mixerzoo.ops.norms import gated_rms_norm_linear

        return gated_rms_norm_linear(y, z, self.weight, proj_weight, group_size=self.group_size,
                                     norm_before_gate=self.norm_before_gate, eps=self.eps)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0: x = y + log(1 - exp(-y)), stable for small y."""
    return y + torch.log(-torch.expm1(-y))


class Mamba2(Mixer):
    """Mamba-2 mixer (SSD with scalar-per-head decay).

    Shapes: ``d_inner = expand * d_model`` split into ``H = d_inner // head_dim`` heads of
    ``P = head_dim`` channels; B and C have ``ngroups`` groups of ``d_state`` (N) channels.

    Backends: ``"auto"`` (mamba-ssm's Triton SSD on CUDA when it imports, else torch),
    ``"triton"`` (mamba-ssm, CUDA only), ``"torch"`` (chunked SSD), ``"naive"`` (quadratic SSD).
    Decoding always runs the torch recurrence. ``kernels`` ("fused" / "reference") picks the
    small ops (gated norm, short conv, the fused input and output projections); the model
    passes its own.
    """

    accepts_kernels = True

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1, 16),
        conv_bias: bool = True,
        bias: bool = False,
        norm_before_gate: bool = False,
        backend: str = "auto",
        kernels: str = "fused",
    ):
        super().__init__(d_model, layer_idx=layer_idx)
        self.kernels = check_kernels(kernels)
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("head_dim", head_dim), ("ngroups", ngroups),
                            ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        d_inner = expand * d_model
        if d_inner % head_dim != 0:
            raise ValueError(
                f"expand * d_model = {d_inner} must be divisible by head_dim={head_dim}"
            )
        nheads = d_inner // head_dim
        if nheads % ngroups != 0:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init_floor <= 0:
            raise ValueError(f"dt_init_floor must be positive, got {dt_init_floor}")
        if len(A_init_range) != 2 or not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {A_init_range}")
        self.backend = check_backend(backend, ("auto", "triton", "torch", "naive"))
        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.head_dim, self.ngroups, self.chunk_size = head_dim, ngroups, chunk_size
        self.d_inner, self.nheads = d_inner, nheads
        self.conv_dim = d_inner + 2 * ngroups * d_state
        # in_proj output, in order: z (gate), xBC (conv input), dt, then any extra columns.
        self.in_proj_splits = [d_inner, self.conv_dim, nheads]
        self.in_proj = nn.Linear(d_model, sum(self.in_proj_splits), bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.ones(nheads))
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups, norm_before_gate, kernels=kernels)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._init_ssm(dt_min, dt_max, dt_init_floor, A_init_range)

    @torch.no_grad()
    def _init_ssm(self, dt_min, dt_max, dt_init_floor, A_init_range) -> None:
        # dt log-uniform in [dt_min, dt_max]; dt_bias is its inverse softplus, so that
        # softplus(dt_bias) is the initial step size when the projected dt is zero.
        u = torch.rand(self.nheads)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(_inverse_softplus(dt.clamp(min=dt_init_floor)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D.fill_(1.0)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def _widen_in_proj(self, extra: int) -> None:
        """Append ``extra`` output columns to in_proj (for subclasses, called in __init__)."""
        old = self.in_proj
        self.in_proj_splits.append(extra)
        self.in_proj = nn.Linear(
            self.d_model, sum(self.in_proj_splits), bias=old.bias is not None,
            device=old.weight.device, dtype=old.weight.dtype,
        )
        with torch.no_grad():
            self.in_proj.weight[: old.out_features].copy_(old.weight)
            if old.bias is not None:
                self.in_proj.bias[: old.out_features].copy_(old.bias)

    # --- the sequence op: what a variant replaces ----------------------------------------

    def _pick_backend(self, x: torch.Tensor) -> str:
        return pick_kernel_backend(self.backend, x, load_mamba_chunk_scan_combined, "Mamba2 (mamba-ssm)")

    def _sequence(self, aux, x, dt, A, B, C, extra, state, want_state):
        """The sequence op with its skip connection.

        aux: the list from :meth:`_aux_projections` (projections of the block input), x ``[B, T, H, P]``, dt ``[B, T, H]`` (fp32,
        positive), A ``[H]`` (fp32, negative), B and C ``[B, T, G, N]``, extra
        ``[B, T, e]`` or None, state from :meth:`_init_seq_state` or None for a fresh
        sequence. Returns ``(y [B, T, H, P], new state or None)``.
        """
        backend = self._pick_backend(x)
        if backend == "triton":
            kernel = load_mamba_chunk_scan_combined()
            # dt already has dt_bias and softplus applied, so the kernel's own are turned off.
            out = kernel(
                x, dt, A, B, C, self.chunk_size, D=self.D, z=None, dt_bias=None,
                initial_states=state, dt_softplus=False, return_final_states=want_state,
            )
            y, final = out if want_state else (out, None)
            self._ran("mamba_ssm")
        elif backend == "torch":
            y, final = ssd_chunked(
                x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D,
                initial_state=state, output_final_state=want_state,
            )
            self._ran("torch")
        else:
            y, final = ssd_naive(x, dt, A, B, C, D=self.D, initial_state=state)
            self._ran("naive")
        return y, (final.float() if want_state else None)

    def _sequence_step(self, aux_t, x_t, dt_t, A, B_t, C_t, extra_t, state):
        """One token of :meth:`_sequence`: the same arguments without the T axis."""
        return ssd_step(x_t, dt_t, A, B_t, C_t, state, D=self.D)

    def _init_seq_state(self, batch: int, device) -> Any:
        return torch.zeros(
            batch, self.nheads, self.head_dim, self.d_state, device=device, dtype=torch.float32
        )

    def _seq_state_size(self, seq_len: int) -> int:
        return self.nheads * self.head_dim * self.d_state

    # --- the block -----------------------------------------------------------------------

    def _split(self, zxbcdt: torch.Tensor):
        """Split in_proj output ``[..., sum(splits)]`` into z, xBC, raw dt and extra."""
        parts = torch.split(zxbcdt, self.in_proj_splits, dim=-1)
        z, xBC, dt = parts[:3]
        extra = parts[3] if len(parts) > 3 else None
        return z, xBC, dt, extra

    def _split_xBC(self, xBC: torch.Tensor):
        """xBC ``[..., conv_dim]`` -> x ``[..., H, P]``, B and C ``[..., G, N]``."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        x = rearrange(x, "... (h p) -> ... h p", p=self.head_dim)
        B = rearrange(B, "... (g n) -> ... g n", n=self.d_state)
        C = rearrange(C, "... (g n) -> ... g n", n=self.d_state)
        return x, B, C

    def _dt_A(self, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32: A = -exp(A_log) and the softplus of dt lose too much in bf16, and the kernels
        # expect fp32 dt / A.
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        return dt, A

    def _conv(self, xBC: torch.Tensor, conv_state: torch.Tensor | None, want_state: bool = True):
        """Causal depthwise conv + SiLU over xBC ``[B, T, conv_dim]`` continuing from
        ``conv_state`` ``[B, conv_dim, d_conv - 1]`` (None: zeros). Returns (out, new state),
        the state None when not ``want_state``."""
        if conv_state is None and not want_state and self.kernels == "fused":
            from mixerzoo.ops.conv import causal_conv1d

            # reads xBC in place inside the in_proj output and keeps no padded copy
            return causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias), None
        xt = rearrange(xBC, "b t c -> b c t")
        if conv_state is None:
            padded = F.pad(xt, (self.d_conv - 1, 0))
        else:
            padded = torch.cat((conv_state.to(xt.dtype), xt), dim=-1)
        out = F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        new_state = padded[:, :, padded.shape[-1] - (self.d_conv - 1):]
        return F.silu(rearrange(out, "b c t -> b t c")), new_state

    def _aux_projections(self, u: torch.Tensor) -> list[torch.Tensor]:
        """Projections of the block input u besides in_proj, handed to the sequence op as
        ``aux`` (none here; the log-linear λ MLP's first layer in a subclass)."""
        return []

    def _aux_weights(self) -> list[torch.Tensor]:
        """The (bias-free) weights of :meth:`_aux_projections`, for the fused input path."""
        return []

    def _run(self, u: torch.Tensor, state: Mamba2State | None):
        self.check_input(u)
        return self._run_projected(self.in_proj(u), self._aux_projections(u), state, u.dtype)

    def _run_projected(self, zxbcdt: torch.Tensor, aux: list[torch.Tensor], state: Mamba2State | None,
                       act_dtype: torch.dtype):
        z, xBC, dt_raw, extra = self._split(zxbcdt)
        want = state is not None
        xBC, conv_state = self._conv(xBC, None if state is None else state.conv, want)
        x, B, C = self._split_xBC(xBC)
        dt, A = self._dt_A(dt_raw)
        y, seq_state = self._sequence(
            aux, x, dt, A, B, C, extra, None if state is None else state.seq, want
        )
        y = rearrange(y.to(act_dtype), "b t h p -> b t (h p)")
        new_state = Mamba2State(conv_state, seq_state) if want else None
        if self.kernels == "fused" and self.out_proj.bias is None:
            return self.norm.project(y, z, self.out_proj.weight), new_state
        return self.out_proj(self.norm(y, z)), new_state

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``forward(norm(x))`` for the block's RMSNorm ``norm``, fused into in_proj (and the
        other projections of the block input) when the fused ops are on: the normalised input
        is rebuilt in backward instead of kept."""
        if self.kernels != "fused" or self.in_proj.bias is not None or not hasattr(norm, "eps"):
            return self(norm(x))  # through __call__: hooks and a compiled module still apply
        from mixerzoo.ops.norms import rms_norm_linear

        self.check_input(x)
        weights = [self.in_proj.weight] + self._aux_weights()
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        out = rms_norm_linear(x, norm.weight, w, norm.eps, out_dtype=compute_dtype(x))
        parts = out.split([t.shape[0] for t in weights], dim=-1)
        return self._run_projected(parts[0], list(parts[1:]), None, out.dtype)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)[0]

    def init_state(self, batch: int, device, dtype) -> Mamba2State:
        conv = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        return Mamba2State(conv=conv, seq=self._init_seq_state(batch, device))

    def prefill(self, x: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        return self._run(x, state)

    def step(self, x_t: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x_t [B, {self.d_model}], got {tuple(x_t.shape)}")
        z, xBC, dt_raw, extra = self._split(self.in_proj(x_t))
        window = torch.cat((state.conv.to(xBC.dtype), xBC[:, :, None]), dim=-1)  # [b, c, d_conv]
        conv = torch.einsum("bck,ck->bc", window, self.conv1d.weight[:, 0])
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, B, C = self._split_xBC(F.silu(conv))
        dt, A = self._dt_A(dt_raw)
        y, seq_state = self._sequence_step(self._aux_projections(x_t), x, dt, A, B, C, extra, state.seq)
        y = self.norm(rearrange(y.to(x_t.dtype), "b h p -> b (h p)"), z)
        return self.out_proj(y), Mamba2State(window[:, :, 1:], seq_state)

    def state_size(self, seq_len: int) -> int:
        return self.conv_dim * (self.d_conv - 1) + self._seq_state_size(seq_len)
