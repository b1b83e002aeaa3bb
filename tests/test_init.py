"""A fresh model starts where its reference implementation starts.

Per-parameter statistics (mean, std, and the fourth moment that tells a uniform from a normal
draw) of a freshly built zoo model against a freshly built reference model of the same shape:
transformers' Llama for `softmax`, fla's LogLinearMamba2ForCausalLM for `loglinear`, fla's
LinearAttentionForCausalLM for `linear`; mamba-ssm's MambaLMHeadModel (which does not install
here) for `mamba2` and the other log-linear mixers, through the distributions its code draws.
Each comparison is also shown to fail on a planted mistake.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixerzoo import build_model
from mixerzoo.evals.references import reference_mlp_hidden, reference_model
from mixerzoo.models.init import INIT_CHOICES, family_rule, layer_rules

D, LAYERS, VOCAB = 128, 4, 1000
SHAPE = dict(size="tiny", d_model=D, n_layers=LAYERS, vocab_size=VOCAB)


def _moments(t: torch.Tensor) -> tuple[int, float, float, float]:
    x = t.detach().double().flatten()
    n, mean, std = x.numel(), x.mean().item(), x.std().item() if x.numel() > 1 else 0.0
    kurt = ((x - mean) ** 4).mean().item() / std**4 if std > 0 else 0.0
    return n, mean, std, kurt


def stats_mismatch(name: str, ours: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why two tensors do not look drawn from one distribution, or None.

    Constants must be equal; random tensors of 64+ elements must agree in mean and std within
    six standard errors of the difference of two samples, and, from 10,000 elements, in
    kurtosis (1.8 for a uniform draw, 3 for a normal one) within 0.45.
    """
    if ours.shape != ref.shape:
        return f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    n, m_a, s_a, k_a = _moments(ours)
    _, m_b, s_b, k_b = _moments(ref)
    if s_b < 1e-12:
        if s_a > 1e-12 or abs(m_a - m_b) > 1e-6 * max(1.0, abs(m_b)):
            return f"{name}: constant {m_b:.6g} in the reference, ours mean {m_a:.6g} std {s_a:.3g}"
        return None
    if n < 64:
        return None  # too few values for moments; checked by range elsewhere
    se_mean = s_b * math.sqrt(2.0 / n)
    se_std = s_b * math.sqrt(max(k_b - 1.0, 0.5) / (2.0 * n))
    if abs(m_a - m_b) > 6 * se_mean + 1e-12:
        return f"{name}: mean {m_a:.5g} vs {m_b:.5g} (n={n})"
    if abs(s_a - s_b) > 6 * se_std:
        return f"{name}: std {s_a:.5g} vs {s_b:.5g} (n={n})"
    if n >= 10_000 and abs(k_a - k_b) > 0.45:
        return f"{name}: kurtosis {k_a:.2f} vs {k_b:.2f} (uniform 1.8, normal 3)"
    return None


def all_mismatches(pairs) -> list[str]:
    return [msg for name, a, b in pairs if (msg := stats_mismatch(name, a, b)) is not None]


# --- softmax vs transformers' Llama ------------------------------------------------------


def _llama_pairs(ours, ref):
    p, r = dict(ours.named_parameters()), dict(ref.named_parameters())
    yield "embed", p["embed.weight"], r["model.embed_tokens.weight"]
    for i in range(LAYERS):
        b, rb = f"blocks.{i}.", f"model.layers.{i}."
        for proj in "qkvo":
            yield f"{i}.{proj}_proj", p[b + f"mixer.{proj}_proj.weight"], r[rb + f"self_attn.{proj}_proj.weight"]
        gate_up = torch.cat([r[rb + "mlp.gate_proj.weight"], r[rb + "mlp.up_proj.weight"]])
        yield f"{i}.gate_up", p[b + "mlp.gate_up.weight"], gate_up
        yield f"{i}.down", p[b + "mlp.down.weight"], r[rb + "mlp.down_proj.weight"]
        yield f"{i}.mixer_norm", p[b + "mixer_norm.weight"], r[rb + "input_layernorm.weight"]
        yield f"{i}.mlp_norm", p[b + "mlp_norm.weight"], r[rb + "post_attention_layernorm.weight"]
    yield "norm", p["norm.weight"], r["model.norm.weight"]


def test_softmax_init_is_llamas():
    torch.manual_seed(0)
    ours = build_model("softmax", **SHAPE)
    ref = reference_model(ours)
    assert all_mismatches(_llama_pairs(ours, ref)) == []


@pytest.mark.parametrize("plant", ["initializer_range", "pytorch_default"])
def test_softmax_init_check_catches_a_planted_mistake(plant):
    torch.manual_seed(0)
    ours = build_model("softmax", **SHAPE)
    ref = reference_model(ours)
    if plant == "initializer_range":
        ours.config.initializer_range = 0.03
        ours.init_weights()
    else:  # the scheme before reference inits: PyTorch's kaiming-uniform on every projection
        ours = build_model("softmax", **SHAPE, init="mamba_ssm")
    bad = all_mismatches(_llama_pairs(ours, ref))
    assert any("q_proj" in m for m in bad) and any("down" in m for m in bad), bad


# --- loglinear vs fla's LogLinearMamba2ForCausalLM ------------------------------------------


def _fla_loglinear_pairs(ours, ref):
    p, r = dict(ours.named_parameters()), dict(ref.named_parameters())
    yield "embed", p["embed.weight"], r["backbone.embeddings.weight"]
    for i in range(LAYERS):
        b, rb = f"blocks.{i}.", f"backbone.layers.{i}."
        for ours_name, ref_name in (("A_log", "A_log"), ("D", "D"), ("lambda_L", "L"),
                                    ("in_proj.weight", "in_proj.weight"), ("conv1d.weight", "conv1d.weight"),
                                    ("conv1d.bias", "conv1d.bias"), ("norm.weight", "norm.weight"),
                                    ("out_proj.weight", "out_proj.weight")):
            yield f"{i}.{ours_name}", p[b + "mixer." + ours_name], r[rb + "mixer." + ref_name]
        gate_up = torch.cat([r[rb + "mlp.gate_proj.weight"], r[rb + "mlp.up_proj.weight"]])
        yield f"{i}.gate_up", p[b + "mlp.gate_up.weight"], gate_up
        yield f"{i}.down", p[b + "mlp.down.weight"], r[rb + "mlp.down_proj.weight"]
        yield f"{i}.mixer_norm", p[b + "mixer_norm.weight"], r[rb + "mixer_norm.weight"]
        yield f"{i}.mlp_norm", p[b + "mlp_norm.weight"], r[rb + "mlp_norm.weight"]
    yield "norm", p["norm.weight"], r["backbone.norm_f.weight"]


def _loglinear_and_fla(**kwargs):
    """Our `loglinear` and fla's model of its shape. fla's log-linear LM fixes its MLP width
    (hidden_ratio 4, rounded up to 256), so ours is built at that width to compare tensors."""
    torch.manual_seed(0)
    ours = build_model("loglinear", **SHAPE, mlp_hidden=reference_mlp_hidden("loglinear", D, 0), **kwargs)
    return ours, reference_model(ours)


def test_loglinear_init_is_fla_log_linear_mamba2s():
    pytest.importorskip("fla")
    ours, ref = _loglinear_and_fla()
    assert all_mismatches(_fla_loglinear_pairs(ours, ref)) == []
    # A = 1..H exactly, and dt from the same log-uniform range
    for i in range(LAYERS):
        assert torch.equal(ours.blocks[i].mixer.A_log, ref.backbone.layers[i].mixer.A_log.float())
        dt = F.softplus(ours.blocks[i].mixer.dt_bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


def test_loglinear_init_check_catches_mamba_ssms_rule():
    pytest.importorskip("fla")
    ours, ref = _loglinear_and_fla(init="mamba_ssm")
    bad = all_mismatches(_fla_loglinear_pairs(ours, ref))
    assert any("conv1d.weight" in m for m in bad) and any("out_proj" in m for m in bad), bad


# --- linear vs fla's LinearAttentionForCausalLM ---------------------------------------------


def test_linear_init_is_flas():
    pytest.importorskip("fla")
    torch.manual_seed(0)
    ours = build_model("linear", **SHAPE)
    ref = reference_model(ours)
    p, r = dict(ours.named_parameters()), dict(ref.named_parameters())
    pairs = [("embed", p["embed.weight"], r["model.embeddings.weight"]), ("norm", p["norm.weight"], r["model.norm.weight"])]
    for i in range(LAYERS):
        b, rb = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(f"{i}.{x}_proj", p[b + f"mixer.{x}_proj.weight"], r[rb + f"attn.{x}_proj.weight"]) for x in "qkvo"]
        pairs += [(f"{i}.out_norm", p[b + "mixer.norm.weight"], r[rb + "attn.norm.weight"]),
                  (f"{i}.gate_up", p[b + "mlp.gate_up.weight"],
                   torch.cat([r[rb + "mlp.gate_proj.weight"], r[rb + "mlp.up_proj.weight"]])),
                  (f"{i}.down", p[b + "mlp.down.weight"], r[rb + "mlp.down_proj.weight"])]
    assert all_mismatches(pairs) == []


# --- the Mamba-2 family vs mamba-ssm's MambaLMHeadModel ---------------------------------------
# mamba_ssm/models/mixer_seq_simple.py `_init_weights`: Linear weights keep PyTorch's
# kaiming-uniform (bound 1/sqrt(fan_in)), biases 0, convolutions PyTorch's default, the embedding
# N(0, 0.02), out_proj and fc2 kaiming-uniform / sqrt(n_layer) (the LM head model's second pass).


def _uniform(bound: float, shape) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound)


def _mamba_ssm_expected(model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, ours, a sample from the distribution mamba-ssm's code draws that tensor from)."""
    p = dict(model.named_parameters())
    pairs = [("embed", p["embed.weight"], torch.randn(VOCAB, D, dtype=torch.float64) * 0.02),
             ("norm", p["norm.weight"], torch.ones(D))]
    for i in range(LAYERS):
        b = f"blocks.{i}."
        w_in, w_out = p[b + "mixer.in_proj.weight"], p[b + "mixer.out_proj.weight"]
        conv_w, conv_b = p[b + "mixer.conv1d.weight"], p[b + "mixer.conv1d.bias"]
        gate_up, down = p[b + "mlp.gate_up.weight"], p[b + "mlp.down.weight"]
        pairs += [
            (f"{i}.in_proj", w_in, _uniform(1 / math.sqrt(D), w_in.shape)),
            (f"{i}.out_proj", w_out, _uniform(1 / math.sqrt(w_out.shape[1] * LAYERS), w_out.shape)),
            (f"{i}.conv1d.weight", conv_w, _uniform(1 / math.sqrt(conv_w.shape[-1]), conv_w.shape)),
            (f"{i}.conv1d.bias", conv_b, _uniform(1 / math.sqrt(conv_w.shape[-1]), conv_b.shape)),
            (f"{i}.gate_up", gate_up, _uniform(1 / math.sqrt(D), gate_up.shape)),
            (f"{i}.down", down, _uniform(1 / math.sqrt(down.shape[1] * LAYERS), down.shape)),
            (f"{i}.D", p[b + "mixer.D"], torch.ones_like(p[b + "mixer.D"])),
            (f"{i}.gated_norm", p[b + "mixer.norm.weight"], torch.ones_like(p[b + "mixer.norm.weight"])),
            (f"{i}.mixer_norm", p[b + "mixer_norm.weight"], torch.ones(D)),
            (f"{i}.mlp_norm", p[b + "mlp_norm.weight"], torch.ones(D)),
        ]
    return pairs


@pytest.mark.parametrize("name", ["mamba2", "loglinear_fixed", "loglinear_adaptive", "loglinear_adaptive_x"])
def test_mamba2_family_init_is_mamba_ssms(name):
    torch.manual_seed(0)
    model = build_model(name, **SHAPE)
    assert all_mismatches(_mamba_ssm_expected(model)) == []
    for block in model.blocks:
        m = block.mixer
        A = torch.exp(m.A_log)
        assert A.min() >= 1 and A.max() <= 16  # A_init_range (1, 16), mamba2.py l. 133
        dt = F.softplus(m.dt_bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


def test_mamba2_init_check_catches_a_planted_mistake():
    torch.manual_seed(0)
    bad = all_mismatches(_mamba_ssm_expected(build_model("mamba2", **SHAPE, init="llama")))
    assert any("out_proj" in m for m in bad) and any("conv1d" in m for m in bad), bad


def test_mamba_ssm_itself_where_it_imports():
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    width = reference_mlp_hidden("mamba2", D, build_model("mamba2", **SHAPE).config.mlp_hidden)
    ours = build_model("mamba2", **SHAPE, mlp_hidden=width)
    r = dict(reference_model(ours).named_parameters())
    keys = {"in_proj": "mixer.in_proj.weight", "out_proj": "mixer.out_proj.weight", "down": "mlp.fc2.weight",
            "conv1d.weight": "mixer.conv1d.weight", "conv1d.bias": "mixer.conv1d.bias"}
    pairs = [(name, t, r[f"backbone.layers.{name.split('.')[0]}.{keys[name.split('.', 1)[1]]}"])
             for name, t, _ in _mamba_ssm_expected(ours) if name.split(".", 1)[-1] in keys]
    assert pairs and all_mismatches(pairs) == []


# --- the adaptive λ: the paper's LambdaMLPSoftplus --------------------------------------------


def test_adaptive_lambda_is_the_papers_mlp_on_the_lambda_logits():
    torch.manual_seed(0)
    model = build_model("loglinear_adaptive", **SHAPE)
    m = model.blocks[0].mixer
    L, hidden = m.max_levels, m.lambda_hidden
    assert m.lambda_input == "dl" and m.lambda_act == "gelu"
    assert m.lambda_fc1.weight.shape == (hidden, L) and m.lambda_fc2.weight.shape == (L, hidden)
    # W1 xavier-uniform (bound sqrt(6 / (fan_in + fan_out))), told from PyTorch's default
    # (bound 1/sqrt(fan_in), 7% narrower here) by its spread over the W1 of eight layers
    deep = build_model("loglinear_adaptive", **{**SHAPE, "n_layers": 8})
    w1 = torch.cat([b.mixer.lambda_fc1.weight.flatten() for b in deep.blocks])
    assert stats_mismatch("W1", w1, _uniform(math.sqrt(6 / (L + hidden)), w1.shape)) is None
    assert stats_mismatch("W1", w1, _uniform(1 / math.sqrt(L), w1.shape)) is not None
    assert torch.all(m.lambda_fc1.bias == 0) and torch.all(m.lambda_fc2.weight == 0)
    assert torch.allclose(m.lambda_fc2.bias, torch.full((L,), 0.54))
    # λ from the in_proj's dl columns, per head, through the one shared MLP
    with torch.no_grad():
        m.lambda_fc2.weight.normal_(0, 0.5)
        u = torch.randn(2, 5, D)
        dl = m.in_proj(u)[..., -m.nheads * L:].reshape(2, 5, m.nheads, L)
        want = F.softplus(F.linear(F.gelu(F.linear(dl, m.lambda_fc1.weight, m.lambda_fc1.bias)),
                                   m.lambda_fc2.weight, m.lambda_fc2.bias))
        got = m._lambda(u, m.in_proj(u)[..., -m.nheads * L:])
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-6)


def test_adaptive_lambda_starts_near_one_and_matches_parameters():
    from mixerzoo.models.build import param_rows

    model = build_model("loglinear_adaptive", **SHAPE)
    m = model.blocks[0].mixer
    dl = torch.randn(3, m.nheads * m.max_levels)
    lam = m._lambda(torch.randn(3, D), dl)
    torch.testing.assert_close(lam.float(), torch.full_like(lam.float(), F.softplus(torch.tensor(0.54)).item()))
    rows = {r["mixer"]: r for r in param_rows("125m", ["loglinear_adaptive", "loglinear_adaptive_x", "loglinear"])}
    assert all(abs(r["deviation"]) < 0.01 for r in rows.values())


def test_paper_softmax_lambda_sums_to_one_over_levels():
    model = build_model("loglinear_adaptive", **SHAPE,
                        mixer_options={"lambda_mode": "mlp_softmax"})
    m = model.blocks[0].mixer
    lam = m._lambda(torch.randn(3, D), torch.randn(3, m.nheads * m.max_levels))
    torch.testing.assert_close(lam.sum(-1), torch.ones(3, m.nheads))


def test_mamba_ssm_rule_keeps_the_lambda_output_bias():
    # mamba-ssm zeroes Linear biases unless marked _no_reinit; λ's output bias sets λ at init
    model = build_model("loglinear_adaptive_x", **SHAPE)
    b = model.blocks[0].mixer.lambda_fc2.bias
    torch.testing.assert_close(F.softplus(b), torch.ones_like(b))


# --- the option and its rules ------------------------------------------------------------


def test_hybrid_takes_each_layers_rule_and_the_first_for_the_backbone():
    torch.manual_seed(0)
    model = build_model(["softmax", "mamba2"], **SHAPE)
    assert layer_rules(model.config) == ["llama", "mamba_ssm"] * 2
    assert family_rule(model.config) == "llama"
    q = model.blocks[0].mixer.q_proj.weight
    out = model.blocks[1].mixer.out_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002
    assert out.abs().max() <= 1 / math.sqrt(out.shape[1] * LAYERS)
    assert abs(model.blocks[1].mlp.down.weight.std().item() - 0.02) < 0.002  # llama backbone


def test_init_choice_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="init must be one of"):
        build_model("softmax", init="xavier")
    model = build_model("mamba2", init="llama")
    model.save_pretrained(tmp_path)
    from mixerzoo.models.config import MixerZooConfig

    assert MixerZooConfig.from_pretrained(tmp_path).init == "llama"
    assert set(INIT_CHOICES) >= {"reference", "llama", "mamba_ssm", "fla", "fla_log_linear_mamba2"}


def test_registry_init_rules_are_checked(tmp_path):
    from mixerzoo.registry import RegistryError, read_registry_file

    path = tmp_path / "reg.yaml"
    path.write_text("mine:\n  class: mixerzoo.mixers.mamba2:Mamba2\n  init: kaiming\n")
    with pytest.raises(RegistryError, match="init rule must be one of"):
        read_registry_file(path)


def test_loading_does_not_reinitialise(tmp_path):
    torch.manual_seed(0)
    model = build_model("loglinear_adaptive", size="tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.125)
    model.save_pretrained(tmp_path)
    from mixerzoo.models.hf import MixerZooForCausalLM

    loaded = MixerZooForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
