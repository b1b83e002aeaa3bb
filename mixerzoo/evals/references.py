"""The reference language models the built-in mixers reproduce, built at a zoo model's shape.

=============  ==============================================  ======================
zoo mixer      reference LM (forward, parameterisation, init)  package
=============  ==============================================  ======================
``softmax``    ``LlamaForCausalLM`` (``qk_norm``: Qwen3)        transformers
``mamba2``     ``MambaLMHeadModel`` with Mamba-2 layers         mamba-ssm (optional)
``loglinear``  ``LogLinearMamba2ForCausalLM``                   fla
``linear``     ``LinearAttentionForCausalLM``                   fla
=============  ==============================================  ======================

:func:`reference_model` builds the reference of a zoo model (every layer one of these mixers,
tied head) with the reference's own initialisation, for training the two side by side
(``scripts/reference_parity.py``) or comparing fresh-model statistics (the tests). Two
references fix their MLP width by their own rule (mamba-ssm rounds it up to a multiple of 128,
fla's log-linear LM uses 4·d·2/3 rounded up to 256): :func:`reference_mlp_hidden` gives the
width to build the zoo side with, so both sides have the same shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

REFERENCES = {
    "softmax": "transformers LlamaForCausalLM",
    "mamba2": "mamba-ssm MambaLMHeadModel",
    "loglinear": "fla LogLinearMamba2ForCausalLM",
    "linear": "fla LinearAttentionForCausalLM",
}


def reference_mlp_hidden(name: str, d_model: int, mlp_hidden: int) -> int:
    """The SwiGLU width the reference of mixer ``name`` builds when asked for ``mlp_hidden``."""
    if name == "mamba2":  # mamba_ssm/modules/mlp.py GatedMLP: multiple_of=128
        return 128 * math.ceil(mlp_hidden / 128)
    if name == "loglinear":  # fla LogLinearMamba2Block: GatedMLP(hidden_ratio=4), 256-aligned
        return 256 * math.ceil(int(d_model * 4 * 2 / 3) / 256)
    return mlp_hidden


def _single_mixer(model) -> str:
    names = {layer["mixer"] for layer in model.config.layers}
    if len(names) != 1 or next(iter(names)) not in REFERENCES:
        raise ValueError(f"reference_model: the model's layers run {sorted(names)}; a reference LM exists for "
                         f"models of one of {sorted(REFERENCES)}")
    if model.lm_head is not None:
        raise ValueError("reference_model: build the zoo model with tied embeddings (the default)")
    return next(iter(names))


def reference_model(model) -> nn.Module:
    """A freshly initialised reference LM of ``model``'s shape (on the CPU, fp32).

    Raises ImportError when the reference's package is missing (mamba-ssm is optional) and
    ValueError when the shapes cannot match (another MLP width: see reference_mlp_hidden).
    """
    name = _single_mixer(model)
    cfg = model.config
    mixer = model.blocks[0].mixer
    want = reference_mlp_hidden(name, cfg.d_model, cfg.mlp_hidden)
    if want != cfg.mlp_hidden:
        raise ValueError(f"reference_model: the {REFERENCES[name]} builds an MLP of width {want} where the zoo "
                         f"model has {cfg.mlp_hidden}; build the zoo model with mlp_hidden={want}")
    build = {"softmax": _llama, "mamba2": _mamba_ssm, "loglinear": _fla_log_linear, "linear": _fla_linear}[name]
    return build(cfg, mixer)


def _llama(cfg, mixer) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    qk_norm = mixer.q_norm is not None
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=mixer.num_heads,
        num_key_value_heads=mixer.num_kv_heads, head_dim=mixer.head_dim, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True, max_position_embeddings=1 << 20,
        initializer_range=cfg.initializer_range,
    )
    if qk_norm:
        return Qwen3ForCausalLM(Qwen3Config(rope_theta=mixer.rope_base, **kwargs))
    return LlamaForCausalLM(LlamaConfig(rope_theta=mixer.rope_base, **kwargs))


def _mamba_ssm(cfg, mixer) -> nn.Module:
    from ..ops.external import load_mamba_lm_head_model

    lm_class = load_mamba_lm_head_model()
    from mamba_ssm.models.config_mamba import MambaConfig

    ssm_cfg = {"layer": "Mamba2", "d_state": mixer.d_state, "d_conv": mixer.d_conv, "expand": mixer.expand,
               "headdim": mixer.head_dim, "ngroups": mixer.ngroups, "chunk_size": mixer.chunk_size}
    # fused_add_norm off: its Triton kernel needs CUDA, and the plain norm is the same math
    mcfg = MambaConfig(d_model=cfg.d_model, d_intermediate=cfg.mlp_hidden, n_layer=cfg.n_layers,
                       vocab_size=cfg.vocab_size, ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True,
                       fused_add_norm=False, pad_vocab_size_multiple=1, tie_embeddings=True)
    return lm_class(mcfg, initializer_cfg={"initializer_range": cfg.initializer_range})


def _fla_log_linear(cfg, mixer) -> nn.Module:
    from fla.models import LogLinearMamba2Config, LogLinearMamba2ForCausalLM

    fcfg = LogLinearMamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_heads=mixer.nheads, head_dim=mixer.head_dim, state_size=mixer.d_state, expand=mixer.expand,
        n_groups=mixer.ngroups, conv_kernel=mixer.d_conv, chunk_size=mixer.chunk_size, use_conv_bias=True,
        use_bias=False, norm_eps=cfg.norm_eps, tie_word_embeddings=True, fuse_cross_entropy=False,
        initializer_range=cfg.initializer_range)
    return LogLinearMamba2ForCausalLM(fcfg)


def _fla_linear(cfg, mixer) -> nn.Module:
    from fla.models import LinearAttentionConfig, LinearAttentionForCausalLM

    fcfg = LinearAttentionConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_heads=mixer.num_heads, intermediate_size=cfg.mlp_hidden, feature_map=mixer.feature_map,
        norm_eps=cfg.norm_eps, tie_word_embeddings=True, fuse_norm=False, fuse_cross_entropy=False,
        initializer_range=cfg.initializer_range)
    return LinearAttentionForCausalLM(fcfg)


def reference_logits(ref: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits of a reference LM (they differ in call and output conventions)."""
    out = ref(input_ids=input_ids) if not type(ref).__name__.startswith("MambaLMHead") else ref(input_ids)
    return out.logits
