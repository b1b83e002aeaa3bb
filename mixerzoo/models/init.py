"""Reference initialisation: a fresh model starts where its reference implementation starts.

Each built-in mixer names, in the registry, the rule of the code it reproduces (``init:``):

- ``llama``: transformers' ``PreTrainedModel._init_weights``, which ``LlamaPreTrainedModel``
  uses unchanged (transformers/modeling_utils.py, ``_init_weights``): every Linear and Conv1d
  weight N(0, initializer_range), biases 0, the embedding N(0, initializer_range), norms 1.
  No residual rescaling.
- ``fla``: fla's ``FLAPreTrainedModel._init_weights`` (fla/models/modeling_utils.py, l. 57),
  which ``LinearAttentionForCausalLM`` uses with ``prenorm_residual_strategy=None``: the same
  numbers as ``llama``.
- ``mamba_ssm``: mamba-ssm's ``MambaLMHeadModel`` (mamba_ssm/models/mixer_seq_simple.py,
  ``_init_weights``, l. 92-121, applied at l. 181 and again at l. 264). Linear weights keep
  PyTorch's default (kaiming-uniform, bound 1/√fan_in), Linear biases are zeroed unless marked
  ``_no_reinit``, convolutions keep PyTorch's default, the embedding is N(0, 0.02), and every
  ``out_proj`` / ``fc2`` (our SwiGLU ``down``) is redrawn kaiming-uniform and divided by
  √n_layer (the model's second ``apply`` uses ``n_residuals_per_layer=1``, overriding the
  backbone's 2). dt, A and D come from the Mamba-2 constructor (mamba_ssm/modules/mamba2.py,
  l. 114-140), as ours do.
- ``fla_log_linear_mamba2``: fla's ``LogLinearMamba2PreTrainedModel._init_weights``
  (fla/models/log_linear_mamba2/modeling_log_linear_mamba2.py, l. 163-262): Linear and Conv1d
  N(0, initializer_range) with zero biases, A = 1..H (``A_log = log(arange(1, H + 1))``),
  D = 1, the λ scale L = 1, dt as Mamba-2, norms 1, and the mixer's ``out_proj`` kaiming-uniform
  divided by √(2·n_layer). That code also means to rescale the MLP's ``down_proj``, but under
  transformers 5 its MLP (a module with no parameters of its own) is skipped by transformers'
  custom-code init check, so fla's model runs with ``down_proj`` at N(0, initializer_range);
  we reproduce what runs, which is what a model trained beside it starts from.

``init="reference"`` (the default) takes each layer's own rule, so a hybrid initialises every
layer as its family does; the backbone's shared parts (embedding, SwiGLU MLP, norms, untied
head) follow the rule of the first layer that names one, else ``llama``. A user mixer that
names no rule keeps the initialisation its constructor gave it. Naming a rule instead
(``init="mamba_ssm"``) applies it to every layer and the backbone.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..registry import INIT_RULES

INIT_CHOICES = ("reference",) + INIT_RULES


def check_init(value: object, where: str = "init") -> str:
    """``value`` if it names an initialisation (``reference`` or a rule), else a clear error."""
    if value not in INIT_CHOICES:
        raise ValueError(f"{where} must be one of {list(INIT_CHOICES)}, got {value!r}")
    return value  # type: ignore[return-value]




def layer_rules(config) -> list[str | None]:
    """The rule each layer is initialised with under ``config.init``."""
    init = getattr(config, "init", "reference")
    if init != "reference":
        return [init] * len(config.layers)
    return [layer.get("init") for layer in config.layers]


def family_rule(config) -> str:
    """The rule of the backbone's shared parts: the first layer's that names one, else llama."""
    return next((r for r in layer_rules(config) if r is not None), "llama")


# --- writes that leave loaded tensors alone ----------------------------------------------
# transformers calls the model's initialisation again after loading a checkpoint, with every
# loaded tensor flagged `_is_hf_initialized`; nothing here may overwrite such a tensor.


def _writable(p: torch.Tensor | None) -> bool:
    return p is not None and not p.is_meta and not getattr(p, "_is_hf_initialized", False)


def _normal(p: torch.Tensor | None, std: float) -> None:
    if _writable(p):
        p.normal_(0.0, std)


def _fill(p: torch.Tensor | None, value: float) -> None:
    if _writable(p):
        p.fill_(value)


def _kaiming_scaled(p: torch.Tensor, divisor: float) -> None:
    """PyTorch's Linear default (kaiming-uniform with a = √5, bound 1/√fan_in) divided by
    ``divisor``, drawn as one uniform so a loaded tensor is never touched."""
    if _writable(p):
        bound = 1.0 / math.sqrt(p.shape[1]) / divisor
        p.uniform_(-bound, bound)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def _norm_ones(module: nn.Module) -> None:
    if _is_norm(module):
        _fill(getattr(module, "weight", None), 1.0)
        _fill(getattr(module, "bias", None), 0.0)


# --- the rules, per mixer and for the backbone ---------------------------------------------


def _normal_everywhere(mixer: nn.Module, std: float) -> None:
    for m in mixer.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
            _normal(m.weight, std)
            _fill(getattr(m, "bias", None), 0.0)
        else:
            _norm_ones(m)


def _mixer_llama(mixer: nn.Module, std: float, n_layers: int) -> None:
    _normal_everywhere(mixer, std)


def _mixer_mamba_ssm(mixer: nn.Module, std: float, n_layers: int) -> None:
    for m in mixer.modules():
        if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
            _fill(m.bias, 0.0)
        out_proj = getattr(m, "out_proj", None)
        if isinstance(out_proj, nn.Linear):
            _kaiming_scaled(out_proj.weight, math.sqrt(n_layers))


def _mixer_fla_log_linear_mamba2(mixer: nn.Module, std: float, n_layers: int) -> None:
    _normal_everywhere(mixer, std)
    if hasattr(mixer, "A_log") and _writable(mixer.A_log):
        heads = mixer.A_log.shape[0]
        mixer.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
    _fill(getattr(mixer, "D", None), 1.0)
    _fill(getattr(mixer, "lambda_L", None), 1.0)
    out_proj = getattr(mixer, "out_proj", None)
    if isinstance(out_proj, nn.Linear):
        _kaiming_scaled(out_proj.weight, math.sqrt(2 * n_layers))


_MIXER_RULES: dict[str, Callable[[nn.Module, float, int], None]] = {
    "llama": _mixer_llama,
    "fla": _mixer_llama,
    "mamba_ssm": _mixer_mamba_ssm,
    "fla_log_linear_mamba2": _mixer_fla_log_linear_mamba2,
}


def _backbone(model: nn.Module, rule: str, std: float, n_layers: int) -> None:
    emb_std = model.config.embedding_init_std
    _normal(model.embed.weight, std if emb_std is None else emb_std)
    norms = [model.norm] + [n for b in model.blocks for n in (b.mixer_norm, b.mlp_norm)]
    for norm in norms:
        _fill(norm.weight, 1.0)
    for block in model.blocks:
        gate_up, down = block.mlp.gate_up.weight, block.mlp.down.weight
        if rule == "mamba_ssm":
            _kaiming_scaled(gate_up, 1.0)  # fc1 at PyTorch's default
            _kaiming_scaled(down, math.sqrt(n_layers))  # fc2, as out_proj
        else:
            _normal(gate_up, std)
            _normal(down, std)
    if model.lm_head is not None:
        # mamba-ssm always ties its head; an untied one is a Linear at PyTorch's default there
        if rule == "mamba_ssm":
            _kaiming_scaled(model.lm_head.weight, 1.0)
        else:
            _normal(model.lm_head.weight, std)


@torch.no_grad()
def init_model(model: nn.Module) -> None:
    """Initialise ``model`` (a ``MixerZooForCausalLM``) by its config's ``init`` (see the module
    docstring).

    Tensors flagged ``_is_hf_initialized`` (loaded from a checkpoint) and meta tensors are left
    as they are, so this is safe to run after loading.
    """
    cfg = model.config
    std, n_layers = cfg.initializer_range, len(model.blocks)
    for block, rule in zip(model.blocks, layer_rules(cfg)):
        if rule is not None:
            _MIXER_RULES[rule](block.mixer, std, n_layers)
    _backbone(model, family_rule(cfg), std, n_layers)
