"""Built-in mixers against the reference implementations they claim to be, weight for weight.

Each zoo module's parameters are copied into the reference's own module; both run the same
input in fp32 on the CPU, and the outputs and the gradient of every mapped parameter (and of
the input) must agree to fp32 round-off. Every check is then shown to fail on a planted
mistake, so that a passing check means something.

- ``softmax`` (whole model) against transformers' Llama (and Qwen3 for ``qk_norm``);
- ``mamba2`` against fla's Mamba-2 layer on its torch path;
- ``loglinear`` (``lambda_mode="linear"``) against fla's log-linear Mamba-2 layer, with fla's
  quadratic log-linear op in place of its Triton one.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo import build_model
from mixerzoo.mixers.loglinear import LogLinearMamba2
from mixerzoo.mixers.mamba2 import Mamba2
from tests.utils import TOLERANCE, rel_err

TOL = TOLERANCE[torch.float32]
PLANTED = 1e-3  # a planted mistake must push some error past this
VOCAB, BATCH, T = 128, 2, 37  # T is no multiple of any chunk size used here
D_MODEL, HEAD_DIM, D_STATE, CHUNK = 64, 16, 16, 16
ROPE_BASE = 10000.0

# (zoo parameter name, reference parameter names): several reference names are the zoo
# tensor split along dim 0, in that order.
Mapping = Sequence[tuple[str, Sequence[str]]]


# --- shared helpers -----------------------------------------------------------------------

def _scramble(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Noise on every parameter, so that no mapped tensor keeps an init value (ones, zeros)
    that a reference might share by accident and hide a missing or swapped copy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _copy(zoo: nn.Module, ref: nn.Module, mapping: Mapping) -> None:
    zp, rp = dict(zoo.named_parameters()), dict(ref.named_parameters())
    with torch.no_grad():
        for zname, rnames in mapping:
            targets = [rp[n] for n in rnames]
            parts = zp[zname].split([t.shape[0] for t in targets])
            for t, part in zip(targets, parts):
                assert t.shape == part.shape, f"{zname} -> {rnames}: {tuple(part.shape)} vs {tuple(t.shape)}"
                t.copy_(part)


def _grad_errors(zoo: nn.Module, ref: nn.Module, mapping: Mapping) -> dict[str, float]:
    zp, rp = dict(zoo.named_parameters()), dict(ref.named_parameters())
    errs = {}
    for zname, rnames in mapping:
        ref_grad = torch.cat([rp[n].grad for n in rnames])
        assert zp[zname].grad is not None, f"no gradient reached {zname}"
        errs[f"d{zname}"] = rel_err(zp[zname].grad, ref_grad)
    return errs


def _report(what: str, errs: dict[str, float]) -> None:
    worst = max(errs, key=errs.get)
    print(f"\n{what}: worst {worst} {errs[worst]:.2e}; " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


def _assert_match(what: str, errs: dict[str, float]) -> None:
    _report(what, errs)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{what}: relative errors above {TOL:.0e}: {bad}"


def _assert_caught(what: str, errs: dict[str, float]) -> None:
    _report(what, errs)
    assert max(errs.values()) > PLANTED, f"{what}: the planted mistake went unnoticed ({errs})"


# --- softmax: the whole model against transformers' Llama / Qwen3 --------------------------

def _zoo_lm(kernels: str = "fused", **mixer_options) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("softmax", size="tiny", vocab_size=VOCAB, mixer_options=mixer_options or None,
                        kernels=kernels)
    _scramble(model, seed=1)
    return model.eval()


def _hf_lm(zoo: nn.Module, family: str = "llama", rope_base: float = ROPE_BASE) -> nn.Module:
    """The reference built from the zoo's sizes, but with the rope base the zoo promises
    (not the one it was built with), so that a wrong base in the zoo shows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg, attn = zoo.config, zoo.blocks[0].mixer
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    config = config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=len(zoo.blocks), num_attention_heads=attn.num_heads,
        num_key_value_heads=attn.num_kv_heads, head_dim=attn.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_base}, max_position_embeddings=256,
        tie_word_embeddings=True, attention_bias=False, hidden_act="silu",
        # eager, not sdpa: the zoo attends with SDPA, so the reference should not
        attn_implementation="eager",
    )
    torch.manual_seed(2)
    ref = model_cls(config).eval()
    assert ref.config._attn_implementation == "eager"
    assert ref.lm_head.weight is ref.model.embed_tokens.weight, "reference head is not tied"
    if family == "qwen3":
        # Qwen3 uses rms_norm_eps for its q/k norms too; the zoo's per-head norms have their own
        for layer, block in zip(ref.model.layers, zoo.blocks):
            layer.self_attn.q_norm.variance_epsilon = block.mixer.q_norm.eps
            layer.self_attn.k_norm.variance_epsilon = block.mixer.k_norm.eps
    return ref


def llama_mapping(zoo: nn.Module, *, swap_gate_up: bool = False, qk_norm: bool = False) -> list:
    gate_up = ["mlp.up_proj.weight", "mlp.gate_proj.weight"] if swap_gate_up else \
        ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    mapping = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"])]
    for i in range(len(zoo.blocks)):
        z, r = f"blocks.{i}.", f"model.layers.{i}."
        mapping += [
            (z + "mixer_norm.weight", [r + "input_layernorm.weight"]),
            *((z + f"mixer.{p}.weight", [r + f"self_attn.{p}.weight"]) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            (z + "mlp_norm.weight", [r + "post_attention_layernorm.weight"]),
            (z + "mlp.gate_up.weight", [r + n for n in gate_up]),
            (z + "mlp.down.weight", [r + "mlp.down_proj.weight"]),
        ]
        if qk_norm:
            mapping += [(z + f"mixer.{p}.weight", [r + f"self_attn.{p}.weight"]) for p in ("q_norm", "k_norm")]
    return mapping


def lm_errors(zoo: nn.Module, ref: nn.Module, mapping: Mapping, ids: torch.Tensor,
              return_logits: bool = True) -> dict[str, float]:
    """Relative errors of logits, loss and every mapped parameter's gradient (the embedding's
    gathers both its input and its tied-head uses) after the next-token loss on ``ids``.
    ``return_logits=False`` takes the zoo's training loss, which never forms the logits."""
    _copy(zoo, ref, mapping)
    out, ref_out = zoo(ids, labels=ids, return_logits=return_logits), ref(input_ids=ids, labels=ids)
    out.loss.backward()
    ref_out.loss.backward()
    logits = {"logits": rel_err(out.logits, ref_out.logits)} if return_logits else {}
    return {**logits, "loss": rel_err(out.loss, ref_out.loss), **_grad_errors(zoo, ref, mapping)}


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused_ops", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_softmax_model_matches_llama(kv_heads, fused_ops):
    zoo = _zoo_lm(_kernels(fused_ops), **({} if kv_heads is None else {"num_kv_heads": kv_heads}))
    assert zoo.blocks[0].mixer.num_kv_heads == (kv_heads or zoo.blocks[0].mixer.num_heads)
    errs = lm_errors(zoo, _hf_lm(zoo), llama_mapping(zoo), _ids())
    assert set(zoo.backends().values()) == {"sdpa"}
    _assert_match(f"softmax kv_heads={kv_heads} fused={fused_ops} vs Llama", errs)


@pytest.mark.parametrize("fused_ops", [True, False], ids=["fused", "plain"])
def test_softmax_training_loss_matches_llama(fused_ops):
    zoo = _zoo_lm(_kernels(fused_ops), num_kv_heads=2)
    errs = lm_errors(zoo, _hf_lm(zoo), llama_mapping(zoo), _ids(), return_logits=False)
    _assert_match(f"softmax training loss fused={fused_ops} vs Llama", errs)


def test_softmax_qk_norm_matches_qwen3():
    zoo = _zoo_lm(qk_norm=True, num_kv_heads=2)
    errs = lm_errors(zoo, _hf_lm(zoo, "qwen3"), llama_mapping(zoo, qk_norm=True), _ids())
    _assert_match("softmax qk_norm vs Qwen3", errs)


def test_llama_check_catches_swapped_gate_up():
    zoo = _zoo_lm()
    _assert_caught("planted: gate/up swapped", lm_errors(zoo, _hf_lm(zoo), llama_mapping(zoo, swap_gate_up=True), _ids()))


def test_llama_check_catches_other_rope_base():
    zoo = _zoo_lm(rope_base=500000.0)
    _assert_caught("planted: zoo rope base 5e5", lm_errors(zoo, _hf_lm(zoo), llama_mapping(zoo), _ids()))


# --- Mamba-2 and log-linear Mamba-2 against fla's layers ------------------------------------

@pytest.fixture(scope="module")
def fla_cpu():
    """fla, imported once, and a context in which its layers run on the CPU in torch.

    fla's SiLU and short conv are autotuned Triton kernels, which neither the CPU nor the
    Triton interpreter can run (they are replaced per layer, see ``_fla_mamba2`` and
    ``_fla_loglinear``); its gated RMSNorm kernel runs only under the interpreter, so inside
    the context it is fla's own torch reference of that kernel, and the log-linear op is fla's
    own quadratic one (the only one without Triton).
    """
    pytest.importorskip("fla")
    import fla.layers.log_linear_mamba2 as fla_loglinear
    import fla.layers.mamba2  # noqa: F401
    import fla.modules.norm.layernorm_gated as fla_norm
    from fla.ops.log_linear_attn.naive import naive_log_linear_attn

    def quadratic_op(q, k, v, g, level_scales, scale, **_):
        # the chunked op's keywords, the quadratic op's answer; no final state is asked for
        return naive_log_linear_attn(q, k, v, g, level_scales, scale=scale), None

    @contextlib.contextmanager
    def on_cpu():
        with mock.patch.object(fla_norm, "rmsnorm_fn", fla_norm.rms_norm_ref), \
                mock.patch.object(fla_loglinear, "chunk_log_linear_attn", quadratic_op):
            yield

    # fla logs a fallback warning per layer built without the CUDA kernels
    quiet = [logging.getLogger(n) for n in ("fla", "fla.layers.mamba2", "fla.layers.log_linear_mamba2")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    yield on_cpu
    for lg, level in zip(quiet, levels):
        lg.setLevel(level)


MAMBA2_MAPPING = [(n, [n]) for n in (
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight",
)]
LOGLINEAR_MAPPING = MAMBA2_MAPPING + [("lambda_L", ["L"])]


def _kernels(fused_ops: bool) -> str:
    return "fused" if fused_ops else "reference"


def _zoo_mixer(cls: type, backend: str, **options) -> nn.Module:
    torch.manual_seed(0)
    mixer = cls(D_MODEL, head_dim=HEAD_DIM, d_state=D_STATE, chunk_size=CHUNK, backend=backend, **options)
    _scramble(mixer, seed=1)
    return mixer


def _fla_kwargs(zoo: Mamba2) -> dict:
    return dict(num_heads=zoo.nheads, head_dim=zoo.head_dim, hidden_size=zoo.d_model, state_size=zoo.d_state,
                expand=zoo.expand, n_groups=zoo.ngroups, conv_kernel=zoo.d_conv, use_conv_bias=True,
                use_bias=False, norm_eps=zoo.norm.eps, norm_before_gate=zoo.norm.norm_before_gate)


def _fla_mamba2(zoo: Mamba2) -> tuple[nn.Module, Callable]:
    from fla.layers.mamba2 import Mamba2 as FlaMamba2

    torch.manual_seed(2)
    ref = FlaMamba2(**_fla_kwargs(zoo), chunk_size=CHUNK).eval()
    ref.act = F.silu  # fla's SiLU is a Triton kernel; the function is the same
    return ref, lambda x: ref(x)[0]


def _fla_loglinear(zoo: LogLinearMamba2) -> tuple[nn.Module, Callable]:
    from fla.layers.log_linear_mamba2 import LogLinearMamba2 as FlaLogLinear

    torch.manual_seed(2)
    # fla's layer insists on chunk 64; its quadratic op ignores it
    ref = FlaLogLinear(**_fla_kwargs(zoo), chunk_size=64).eval()
    assert ref.num_lambda_dims == zoo.max_levels, "λ tables of different sizes"

    def conv_silu(x, weight, bias, activation):
        # stands in for the CUDA causal_conv1d the layer would call; it computes what fla's own
        # torch Mamba-2 path does: the layer's nn.Conv1d (padded by d_conv - 1), cut to T, SiLU
        return F.silu(ref.conv1d(x)[..., : x.shape[-1]])

    ref.backend, ref.causal_conv1d_fn = "cuda", conv_silu
    # the layer's forward refuses the CPU; eval mode takes the unfused branch of its inner one
    return ref, lambda x: ref.cuda_kernels_forward(x, None, False, None)[0]


def _run(forward: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of ``forward`` under a fixed random linear loss."""
    x = x.clone().requires_grad_()
    y = forward(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * w.to(y.dtype)).sum().backward()
    return y, x.grad


def mixer_errors(zoo: nn.Module, ref: nn.Module, ref_forward: Callable, mapping: Mapping,
                 x: torch.Tensor) -> dict[str, float]:
    """Relative errors of the output and of the gradients w.r.t. the input and every mapped
    parameter."""
    _copy(zoo, ref, mapping)
    (y, dx), (y_ref, dx_ref) = _run(zoo, x), _run(ref_forward, x)
    return {"out": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref), **_grad_errors(zoo, ref, mapping)}


def reference_roundoff(build_ref: Callable, zoo: nn.Module, mapping: Mapping, x: torch.Tensor) -> dict[str, float]:
    """The keys of :func:`mixer_errors`, for the fp32 reference against itself in fp64.

    The gradients of the decay parameters (A_log, dt_bias) sum many terms of both signs, and
    fla's quadratic ops form decays from differences of cumulative sums; in fp32 the reference
    itself strays about 1e-5 from its fp64 value there. The zoo need not beat that.
    """
    (r32, f32), (r64, f64) = build_ref(zoo), build_ref(zoo)
    _copy(zoo, r32, mapping)
    _copy(zoo, r64, mapping)
    r64.double()
    (y32, dx32), (y64, dx64) = _run(f32, x), _run(f64, x.double())
    p32, p64 = dict(r32.named_parameters()), dict(r64.named_parameters())
    grads = {f"d{z}": rel_err(torch.cat([p32[n].grad for n in rn]), torch.cat([p64[n].grad for n in rn]))
             for z, rn in mapping}
    return {"out": rel_err(y32, y64), "dx": rel_err(dx32, dx64), **grads}


def _assert_match_reference(what: str, errs: dict[str, float], roundoff: dict[str, float]) -> None:
    """Each error within TOL, or within twice the fp32 reference's own round-off if larger."""
    _report(what, errs)
    _report(f"{what}: fp32 reference vs itself in fp64", roundoff)
    bad = {k: (v, roundoff[k]) for k, v in errs.items() if not v <= max(TOL, 2 * roundoff[k])}
    assert not bad, f"{what}: (error, reference round-off) beyond max({TOL:.0e}, 2 x round-off): {bad}"


def _x(t: int = T) -> torch.Tensor:
    return torch.randn(BATCH, t, D_MODEL, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("fused_ops", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("t", [T, 1])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_mamba2_matches_fla(fla_cpu, backend, t, fused_ops):
    zoo = _zoo_mixer(Mamba2, backend, kernels=_kernels(fused_ops))
    ref, ref_forward = _fla_mamba2(zoo)
    with fla_cpu():
        errs = mixer_errors(zoo, ref, ref_forward, MAMBA2_MAPPING, _x(t))
        roundoff = reference_roundoff(_fla_mamba2, zoo, MAMBA2_MAPPING, _x(t))
    assert zoo.last_backend == backend
    _assert_match_reference(f"mamba2 {backend} T={t} fused={fused_ops} vs fla", errs, roundoff)


@pytest.mark.parametrize("planted", ["conv bias not copied", "D and dt_bias swapped"])
def test_mamba2_check_catches_wrong_mapping(fla_cpu, planted):
    mapping = {
        "conv bias not copied": [m for m in MAMBA2_MAPPING if m[0] != "conv1d.bias"],
        "D and dt_bias swapped": [("D", ["dt_bias"]) if m[0] == "dt_bias" else ("dt_bias", ["D"]) if m[0] == "D"
                                  else m for m in MAMBA2_MAPPING],
    }[planted]
    zoo = _zoo_mixer(Mamba2, "torch")
    ref, ref_forward = _fla_mamba2(zoo)
    with fla_cpu():
        _assert_caught(f"planted: mamba2 {planted}", mixer_errors(zoo, ref, ref_forward, mapping, _x()))


def _zoo_loglinear(fla_levels: int, backend: str, kernels: str = "fused") -> LogLinearMamba2:
    zoo = _zoo_mixer(LogLinearMamba2, backend, lambda_mode="linear", max_levels=fla_levels, kernels=kernels)
    with torch.no_grad():
        # levels far from one another, so that a level read off by one shows
        zoo.lambda_L.normal_(1.0, 1.0, generator=torch.Generator().manual_seed(6))
    return zoo


@pytest.fixture(scope="module")
def fla_levels(fla_cpu):
    from fla.layers.log_linear_mamba2 import MAX_NUM_LEVELS

    return MAX_NUM_LEVELS


@pytest.mark.parametrize("fused_ops", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("t", [T, 1])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_loglinear_matches_fla(fla_cpu, fla_levels, backend, t, fused_ops):
    zoo = _zoo_loglinear(fla_levels, backend, _kernels(fused_ops))
    ref, ref_forward = _fla_loglinear(zoo)
    with fla_cpu():
        errs = mixer_errors(zoo, ref, ref_forward, LOGLINEAR_MAPPING, _x(t))
        roundoff = reference_roundoff(_fla_loglinear, zoo, LOGLINEAR_MAPPING, _x(t))
    assert zoo.last_backend == backend
    _assert_match_reference(f"loglinear {backend} T={t} fused={fused_ops} vs fla", errs, roundoff)


def test_loglinear_default_levels_are_fla_levels(fla_levels):
    assert LogLinearMamba2(D_MODEL, lambda_mode="linear", head_dim=HEAD_DIM, d_state=D_STATE).max_levels == fla_levels


@pytest.mark.parametrize("planted", ["L perturbed", "L levels shifted by one"])
def test_loglinear_check_catches_wrong_lambda(fla_cpu, fla_levels, planted):
    zoo = _zoo_loglinear(fla_levels, "torch")
    ref, ref_forward = _fla_loglinear(zoo)
    _copy(zoo, ref, LOGLINEAR_MAPPING)
    mapping = [m for m in LOGLINEAR_MAPPING if m[0] != "lambda_L"]  # L is set by hand below
    with torch.no_grad():
        ref.L.copy_(zoo.lambda_L * 1.1 if planted == "L perturbed" else zoo.lambda_L.roll(1, dims=1))
    with fla_cpu():
        _assert_caught(f"planted: loglinear {planted}", mixer_errors(zoo, ref, ref_forward, mapping, _x()))
