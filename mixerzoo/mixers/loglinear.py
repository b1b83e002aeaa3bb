"""Log-linear Mamba-2: the Mamba-2 block with SSD replaced by log-linear attention.

The sequence op is ``log_linear_attn(q=C, k=B, v=x·dt, g=A·dt, λ)`` plus the ``D·x`` skip;
everything else (in_proj, short conv, gated RMSNorm, out_proj) is
:class:`~mixerzoo.mixers.mamba2.Mamba2`'s. λ weighs the Fenwick levels of the past per head
(and, except in ``fixed`` mode, per token):

- ``fixed``: ``λ[h, ℓ] = softplus(θ[h, ℓ])``, θ initialised to softplus⁻¹(1); passed to the op
  as a ``[1, 1, H, L]`` broadcast, never materialised.
- ``linear`` (Guo et al. 2025; fla's ``LogLinearMamba2``): ``λ = softplus(L[h, ℓ] · dl_t[h, ℓ])``
  with ``dl`` an extra ``H · L`` slice of in_proj and ``L`` initialised to ones. This mode does
  *not* start at λ ≡ 1: ``softplus(dl)`` with a random in_proj slice, as in the original.
- ``mlp`` with ``lambda_input="dl"`` (the adaptive-λ paper's ``LambdaMLPSoftplus``,
  hattention/lambda_mlp.py): the same ``dl`` slice, per head, through one MLP shared by all
  heads, ``λ = softplus(W2 · gelu(W1 dl_t[h] + b1) + b2)``, ``L → lambda_hidden → L``; W1
  xavier-uniform, b1 = 0, W2 = 0, b2 = 0.54 (the paper's constant, softplus(0.54) = 0.9993), so
  λ ≈ 1 at init.
- ``mlp`` with ``lambda_input="x"`` (mixerzoo's variant): the MLP reads the block input u_t,
  ``λ = softplus(W2 · act(W1 u_t + b1) + b2)``, ``d_model → lambda_hidden → H·L``, with
  ``W2 = 0`` and ``b2 = softplus⁻¹(1)``, so the block starts as Mamba-2 exactly.
- ``mlp_softmax`` (ablation): with ``"dl"`` the paper's ``LambdaMLPSoftmax`` (softmax over the
  levels, b2 = 0, so λ = 1/L at init); with ``"x"`` ``λ = L · softmax_ℓ(...)``, which starts at
  λ ≡ 1.

λ has ``max_levels`` levels; longer sequences reuse the top level's λ (the op does that).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mixerzoo.mixers.mamba2 import Mamba2
from mixerzoo.ops import pointwise
from mixerzoo.ops.loglinear import log_linear_attn, log_linear_step, resolve_backend

LAMBDA_MODES = ("fixed", "linear", "mlp", "mlp_softmax")
LAMBDA_INPUTS = ("dl", "x")
LAMBDA_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}
# each λ input's MLP activation as its source has it: GELU in the paper, SiLU in our variant
DEFAULT_ACT = {"dl": "gelu", "x": "silu"}
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1
PAPER_B2 = 0.54  # LambdaMLPSoftplus's output bias (hattention/lambda_mlp.py), ≈ softplus⁻¹(1)


class LogLinearMamba2(Mamba2):
    """Mamba-2 block whose sequence op is log-linear attention with a learned λ.

    Takes every :class:`Mamba2` option plus ``lambda_mode``, ``lambda_input`` (what the MLP
    modes read: ``"dl"``, the per-head λ-logits from in_proj as in the adaptive-λ paper, or
    ``"x"``, the block input), ``lambda_hidden`` (MLP width), ``max_levels`` (λ table size L)
    and ``lambda_act`` (MLP activation; default GELU for ``"dl"``, SiLU for ``"x"``). The
    constructor's default input stays ``"x"`` so that configs saved before ``lambda_input``
    existed rebuild the model they describe; the registry's ``loglinear_adaptive`` names
    ``"dl"``. Backends:
    ``"auto"``, ``"triton"``, ``"torch"``, ``"naive"``, forwarded to ``log_linear_attn``.
    Decoding state: the conv state and a ``LogLinearState`` (None before the first token).
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        lambda_mode: str = "mlp",
        lambda_input: str = "x",
        lambda_hidden: int = 64,
        max_levels: int = 15,
        lambda_act: str | None = None,
        **mamba2_options: Any,
    ):
        if lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode={lambda_mode!r} is not one of {LAMBDA_MODES}")
        if lambda_input not in LAMBDA_INPUTS:
            raise ValueError(f"lambda_input={lambda_input!r} is not one of {LAMBDA_INPUTS}")
        lambda_act = DEFAULT_ACT[lambda_input] if lambda_act is None else lambda_act
        if not isinstance(max_levels, int) or max_levels < 1:
            raise ValueError(f"max_levels must be a positive integer, got {max_levels!r}")
        if not isinstance(lambda_hidden, int) or lambda_hidden < 1:
            raise ValueError(f"lambda_hidden must be a positive integer, got {lambda_hidden!r}")
        if lambda_act not in LAMBDA_ACTS:
            raise ValueError(f"lambda_act={lambda_act!r} is not one of {sorted(LAMBDA_ACTS)}")
        super().__init__(d_model, layer_idx=layer_idx, **mamba2_options)
        self.lambda_mode = lambda_mode
        self.lambda_input = lambda_input
        self.max_levels = max_levels
        self.lambda_hidden = lambda_hidden
        self.lambda_act = lambda_act
        H, L = self.nheads, max_levels
        if lambda_mode == "fixed":
            self.lambda_theta = nn.Parameter(torch.full((H, L), SOFTPLUS_INV_ONE))
            lambda_params = [self.lambda_theta]
        elif lambda_mode == "linear":
            self._widen_in_proj(H * L)
            self.lambda_L = nn.Parameter(torch.ones(H, L))
            lambda_params = [self.lambda_L]
        elif lambda_input == "dl":
            self._widen_in_proj(H * L)
            self.lambda_fc1 = nn.Linear(L, lambda_hidden)
            self.lambda_fc2 = nn.Linear(lambda_hidden, L)
            with torch.no_grad():
                nn.init.xavier_uniform_(self.lambda_fc1.weight)
                self.lambda_fc1.bias.zero_()
                self.lambda_fc2.weight.zero_()
                self.lambda_fc2.bias.fill_(PAPER_B2 if lambda_mode == "mlp" else 0.0)
            lambda_params = [self.lambda_fc2.weight, self.lambda_fc2.bias]
        else:
            self.lambda_fc1 = nn.Linear(d_model, lambda_hidden)
            self.lambda_fc2 = nn.Linear(lambda_hidden, H * L)
            with torch.no_grad():
                self.lambda_fc2.weight.zero_()
                self.lambda_fc2.bias.fill_(SOFTPLUS_INV_ONE)
            lambda_params = [self.lambda_fc2.weight, self.lambda_fc2.bias]
        if lambda_mode in ("mlp", "mlp_softmax"):
            # the output bias sets λ at init; a model-level rule that zeroes Linear biases
            # (mamba-ssm's) must keep it, as mamba-ssm keeps biases marked so
            self.lambda_fc2.bias._no_reinit = True
        # λ is a gate like A_log / D / dt_bias: decaying it towards 0 would silence levels.
        for p in lambda_params:
            p._no_weight_decay = True

    @property
    def _reads_input(self) -> bool:
        return self.lambda_mode in ("mlp", "mlp_softmax") and self.lambda_input == "x"

    def _aux_projections(self, u: torch.Tensor) -> list[torch.Tensor]:
        # the x-input λ MLP's first layer reads the block input: it is fused with in_proj when it can be
        return [F.linear(u, self.lambda_fc1.weight)] if self._reads_input else []

    def _aux_weights(self) -> list[torch.Tensor]:
        return [self.lambda_fc1.weight] if self._reads_input else []

    def _lambda(self, u: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """λ from the block input u ``[..., d_model]`` and the in_proj extra ``[..., H·L]``.

        Returns ``[..., H, L]``, or ``[1, ..., H, L]``-style broadcast (all leading dims 1) for
        ``fixed``; in fp32, except that the per-token ``mlp`` λ is returned in the MLP's dtype
        (bf16 under autocast) when the fused ops are on: it halves what the op keeps, and the
        kernels accumulate in fp32 whatever λ's dtype.
        """
        return self._lambda_from(self._aux_projections(u), extra, u.dim() - 1)

    def _lambda_from(self, aux: list[torch.Tensor], extra: torch.Tensor | None, n_lead: int) -> torch.Tensor:
        """:meth:`_lambda` from the projections of the input (``aux[0]``: the x-input λ MLP's
        first layer before its bias), the in_proj extra and ``n_lead`` leading dims."""
        H, L = self.nheads, self.max_levels
        if self.lambda_mode == "fixed":
            lam = F.softplus(self.lambda_theta.float())
            return lam.reshape((1,) * n_lead + (H, L))
        if self.lambda_mode == "linear":
            dl = rearrange(extra.float(), "... (h l) -> ... h l", l=L)
            return F.softplus(self.lambda_L.float() * dl)
        act = LAMBDA_ACTS[self.lambda_act]
        if self.lambda_input == "dl":
            # one MLP over the L λ-logits of each head, shared by the heads
            dl = rearrange(extra, "... (h l) -> ... h l", l=L)
            logits = self.lambda_fc2(act(self.lambda_fc1(dl)))
        else:
            pre = aux[0]
            hidden = act(pre + self.lambda_fc1.bias.to(pre.dtype))
            logits = rearrange(self.lambda_fc2(hidden), "... (h l) -> ... h l", l=L)
        if self.lambda_mode == "mlp" and self.kernels == "fused":
            return pointwise.softplus(logits)
        logits = logits.float()
        if self.lambda_mode == "mlp":
            return F.softplus(logits)
        if self.lambda_input == "dl":
            return torch.softmax(logits, dim=-1)  # LambdaMLPSoftmax: the levels share a unit
        return L * torch.softmax(logits, dim=-1)

    def _sequence(self, aux, x, dt, A, B, C, extra, state, want_state):
        lam = self._lambda_from(aux, extra, 2)
        # The op owns the choice; resolve_backend states it with the op's own rule.
        name = resolve_backend(self.backend, x.device, dtype=x.dtype, dims=(self.d_state, self.head_dim))
        # v = x·dt, formed in fp32 and cast to x's dtype (q, k, v share one dtype in the op);
        # fused, the op forms it itself and does not keep it for backward.
        if self.kernels == "fused":
            v, v_scale = x, dt
        else:
            v, v_scale = (x.float() * dt[..., None]).to(x.dtype), None
        o, final = log_linear_attn(
            C, B, v, A * dt, lam, scale=1.0, initial_state=state,
            output_final_state=want_state, backend=name, v_scale=v_scale,
        )
        self._ran(name)
        if self.kernels == "fused":
            return pointwise.scale_rows(x, self.D, add=o), final  # o + x·D in one pass each way
        return o + x * self.D[:, None].to(x.dtype), final

    def _sequence_step(self, aux_t, x_t, dt_t, A, B_t, C_t, extra_t, state):
        lam = self._lambda_from(aux_t, extra_t, 1)  # [B, H, L], or [1, H, L] for fixed
        v = (x_t.float() * dt_t[..., None]).to(x_t.dtype)
        o, state = log_linear_step(C_t, B_t, v, A * dt_t, lam, state, scale=1.0)
        return o + x_t * self.D[:, None].to(x_t.dtype), state

    def _init_seq_state(self, batch: int, device) -> Any:
        return None  # log_linear_attn / log_linear_step start from an empty state

    def _seq_state_size(self, seq_len: int) -> int:
        # A state after T tokens holds bit_length(T) level states (one per bit of T).
        return int(seq_len).bit_length() * self.nheads * self.head_dim * self.d_state
