"""Bad input at the model's public boundaries is an error naming the argument, never a silent
default or a wrong answer: build_model, forward, generate/step, and both checkpoint loaders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixerzoo
from mixerzoo.models.io import CheckpointError
from mixerzoo.registry import RegistryError

V = 97


def tiny(name="softmax", **kw):
    torch.manual_seed(0)
    kw.setdefault("vocab_size", V)
    return mixerzoo.build_model(name, size="tiny", **kw).eval()


@pytest.fixture(scope="module")
def model():
    return tiny("softmax")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny("softmax").save_pretrained(path)
    return path


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- build_model ---------------------------------------------------------------------------
@pytest.mark.parametrize("arg, value, err", [
    ("vocab_size", 0, ValueError),
    ("vocab_size", -5, ValueError),
    ("vocab_size", True, TypeError),
    ("vocab_size", 97.0, TypeError),
    ("n_layers", 0, ValueError),
    ("d_model", 0, ValueError),
    ("d_model", -64, ValueError),
    ("mlp_hidden", -1, ValueError),
    ("mlp_hidden", 0, ValueError),
    ("embedding_init_std", 0.0, ValueError),
    ("tie_embeddings", 1, TypeError),
])
def test_build_model_refuses_bad_sizes(arg, value, err):
    kw = {"vocab_size": V, arg: value}
    with pytest.raises(err, match=arg) as info:
        mixerzoo.build_model("softmax", size="tiny", **kw)
    assert repr(value) in str(info.value)


def test_build_model_refuses_bad_sizes_for_every_width_path():
    from mixerzoo.models.build import param_target

    with pytest.raises(ValueError, match="d_model"):
        param_target("tiny", d_model=0)
    with pytest.raises(ValueError, match="n_layers"):
        param_target("tiny", n_layers=0)


@pytest.mark.parametrize("name, option", [("mamba2", "d_state"), ("loglinear_adaptive", "max_levels"),
                                          ("softmax", "head_dim"), ("softmax", "num_kv_heads")])
def test_build_model_refuses_bool_int_options(name, option):
    with pytest.raises(RegistryError, match=option) as info:
        mixerzoo.build_model(name, size="tiny", vocab_size=V, mixer_options={option: True})
    assert "True" in str(info.value)
    with pytest.raises(RegistryError, match=option):
        mixerzoo.build_model(name, size="tiny", vocab_size=V, mixer_options={option: 16.0})


def test_build_model_defaults_still_apply_when_unset():
    m = tiny("softmax", vocab_size=None)
    assert m.config.vocab_size == 32000 and m.config.d_model == 64 and m.config.n_layers == 2


# --- forward -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwarg, value", [
    ("output_hidden_states", True), ("output_attentions", True), ("use_cache", True),
    ("past_key_values", ()), ("inputs_embeds", torch.zeros(1, 4, 64)),
    ("position_ids", torch.arange(4)[None]), ("return_dict", False), ("num_items_in_batch", 8),
    ("logits_to_keep", 1),
])
def test_forward_refuses_semantic_kwargs(model, kwarg, value):
    x = torch.randint(0, V, (1, 4))
    with pytest.raises(ValueError, match=kwarg):
        model(x, **{kwarg: value})


def test_forward_accepts_harmless_kwargs(model):
    x = torch.randint(0, V, (2, 5))
    ref = model(x).logits
    out = model(x, attention_mask=torch.ones_like(x), use_cache=False, return_dict=True,
                output_hidden_states=False, output_attentions=None, past_key_values=None, position_ids=None)
    assert torch.equal(out.logits, ref)


@pytest.mark.parametrize("bad", [V, 1000, -1])
def test_forward_token_id_out_of_vocabulary(model, bad):
    x = torch.randint(0, V, (2, 6))
    x[1, 3] = bad
    with pytest.raises(ValueError, match="input_ids") as info:
        model(x)
    assert str(bad) in str(info.value) and str(V) in str(info.value)


def test_forward_label_out_of_vocabulary(model):
    x = torch.randint(0, V, (2, 6))
    labels = x.clone()
    labels[0, 0] = -100  # ignored: fine
    labels[1, 2] = V + 3
    with pytest.raises(ValueError, match="labels") as info:
        model(x, labels=labels)
    assert str(V + 3) in str(info.value)
    with pytest.raises(TypeError, match="labels"):
        model(x, labels=x.int())


@pytest.mark.parametrize("return_logits", [True, False])
def test_forward_loss_needs_two_tokens(model, return_logits):
    x = torch.randint(0, V, (3, 1))
    with pytest.raises(ValueError, match="labels.*T >= 2"):
        model(x, labels=x, return_logits=return_logits)
    assert model(x).logits.shape == (3, 1, V)  # without labels T = 1 is fine


@pytest.mark.parametrize("return_logits", [True, False])
def test_forward_refuses_labels_with_no_target(model, return_logits):
    x = torch.randint(0, V, (2, 6))
    labels = torch.full_like(x, -100)
    labels[:, 0] = x[:, 0]  # position 0 is never a target: still nothing to average
    with pytest.raises(ValueError, match=r"labels: every target .* -100"):
        model(x, labels=labels, return_logits=return_logits)
    labels[1, 3] = x[1, 3]  # one target is enough
    assert torch.isfinite(model(x, labels=labels, return_logits=return_logits).loss)


def test_forward_labels_shape_and_mask(model):
    x = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :4])
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.full_like(x, 2))


# --- generate / step -----------------------------------------------------------------------
@pytest.mark.parametrize("kw, arg", [
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=0), "top_k"),
    (dict(do_sample=True, top_k=-3), "top_k"),
    (dict(do_sample=True, top_k=True), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_length=2), "max_length"),
    (dict(max_new_tokens=3, max_length=9), "max_length"),
    (dict(temperature=0.7), "temperature"),  # greedy would ignore it
    (dict(top_k=5), "top_k"),
    (dict(eos_token_id=V), "eos_token_id"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(num_beams=4), "num_beams"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(output_scores=True), "output_scores"),
    (dict(return_dict_in_generate=True), "return_dict_in_generate"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(frobnicate=1), "frobnicate"),
])
def test_generate_refuses_bad_options(model, kw, arg):
    prompt = torch.randint(0, V, (1, 4))
    with pytest.raises((TypeError, ValueError), match=arg):
        model.generate(prompt, **{"max_new_tokens": 2, **kw} if "max_length" not in kw else kw)


def test_generate_accepts_neutral_options(model):
    prompt = torch.randint(0, V, (2, 4))
    ref = model.generate(prompt, max_new_tokens=3)
    out = model.generate(prompt, max_new_tokens=3, pad_token_id=0, use_cache=True, num_beams=1,
                         repetition_penalty=1.0, output_scores=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(out, ref)
    assert model.generate(prompt, max_length=7).shape == (2, 7)
    sampled = model.generate(prompt, max_new_tokens=3, do_sample=True, top_p=1.0, top_k=1,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, ref)  # top_k=1 is greedy


def test_generate_and_step_bad_ids(model):
    with pytest.raises(ValueError, match="input_ids") as info:
        model.generate(torch.tensor([[1, 2, V]]), max_new_tokens=2)
    assert str(V) in str(info.value)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.tensor([[1, -2]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, attention_mask=torch.tensor([[0, 1, 1]]))
    logits, state = model.prefill(torch.randint(0, V, (2, 3)))
    with pytest.raises(ValueError, match="token") as info:
        model.step(torch.tensor([1, V + 1]), state)
    assert str(V + 1) in str(info.value)
    with pytest.raises(ValueError, match="token"):
        model.step(torch.tensor([[1], [2]]), state)


# --- checkpoints ---------------------------------------------------------------------------
def _drop_tensor(path):
    weights = path / "model.safetensors"
    sd = load_file(weights)
    dropped = next(k for k in sd if "mlp" in k)
    sd.pop(dropped)
    save_file(sd, weights, metadata={"format": "pt"})
    return dropped


def _add_tensor(path):
    weights = path / "model.safetensors"
    sd = load_file(weights)
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(sd, weights, metadata={"format": "pt"})
    return "blocks.0.extra.weight"


@pytest.mark.parametrize("damage", [_drop_tensor, _add_tensor])
def test_from_pretrained_refuses_partial_weights(saved, tmp_path, damage):
    from transformers import AutoModelForCausalLM

    path = _copy(saved, tmp_path)
    key = damage(path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        type(tiny()).from_pretrained(path)
    with pytest.raises(CheckpointError):
        mixerzoo.load_model(path)


def test_from_pretrained_intact_still_loads(saved):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_edited_model_type_refused_by_both_loaders(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_config(path, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type"):
        mixerzoo.load_model(path)
    with pytest.raises(CheckpointError, match="model_type"):
        type(tiny()).from_pretrained(path)


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "layers", "mlp_hidden"])
def test_config_missing_field_refused(saved, tmp_path, field):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _copy(saved, tmp_path)
    _edit_config(path, **{field: None})
    with pytest.raises(CheckpointError, match=field):
        mixerzoo.load_model(path)
    with pytest.raises(CheckpointError, match=field):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match=field):
        AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("d_model", True), ("layers", [])])
def test_config_invalid_field_refused(saved, tmp_path, field, value):
    path = _copy(saved, tmp_path)
    _edit_config(path, **{field: value})
    with pytest.raises(CheckpointError, match=field):
        mixerzoo.load_model(path)


def test_config_bool_mixer_option_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["layers"][0]["options"]["head_dim"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="head_dim"):
        mixerzoo.load_model(path)


def test_registered_class_that_is_not_a_module_or_returns_the_wrong_shape(monkeypatch):
    import torch

    from mixerzoo import register_mixer
    from mixerzoo.registry import REGISTRY, RegistryError

    class NotModule:
        def __init__(self, d_model, layer_idx=0):
            pass

    class WrongShape(torch.nn.Module):
        def __init__(self, d_model, layer_idx=0):
            super().__init__()
            self.proj = torch.nn.Linear(d_model, 2 * d_model)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(RegistryError, match=r"'tmp_not_module'.*NotModule is not a torch.nn.Module"):
        register_mixer("tmp_not_module", NotModule)  # a class: refused when registered
    assert "tmp_not_module" not in mixerzoo.list_mixers()
    # by import path the class is only known at build time: refused there, with its name
    import sys
    import types

    module = types.ModuleType("tmp_mixers_not_module")
    module.NotModule = NotModule
    sys.modules[module.__name__] = module
    register_mixer("tmp_not_module", "tmp_mixers_not_module:NotModule")
    register_mixer("tmp_wrong_shape", WrongShape)
    try:
        with pytest.raises(RegistryError, match="not a torch.nn.Module"):
            mixerzoo.build_model("tmp_not_module", size="tiny", vocab_size=97)
        model = mixerzoo.build_model("tmp_wrong_shape", size="tiny", vocab_size=97)
        with pytest.raises(ValueError, match=r"WrongShape returned \(1, 5, 128\).*same shape"):
            model(torch.randint(0, 97, (1, 5)))
    finally:
        REGISTRY.remove("tmp_not_module")
        REGISTRY.remove("tmp_wrong_shape")
        sys.modules.pop(module.__name__, None)


def test_a_constructor_that_needs_real_tensors_is_named_with_the_meta_device():
    from mixerzoo import register_mixer
    from mixerzoo.registry import REGISTRY, RegistryError

    class NeedsValues(torch.nn.Module):
        def __init__(self, d_model, layer_idx=0):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(d_model, d_model))
            self.norm = float(self.w.detach().norm())  # reads a value: impossible on meta

        def forward(self, x):
            return x @ self.w

    register_mixer("tmp_needs_values", NeedsValues)
    try:
        for build in (lambda: mixerzoo.build_model("tmp_needs_values", size="tiny", vocab_size=97),
                      lambda: __import__("mixerzoo.models.build", fromlist=["x"]).param_rows("tiny", ["tmp_needs_values"])):
            with pytest.raises(RegistryError, match=r"'tmp_needs_values'.*meta device.*must not read tensor values"):
                build()
    finally:
        REGISTRY.remove("tmp_needs_values")


@pytest.mark.parametrize("options, message", [
    ({"d_state": -4}, "d_state must be a positive integer, got -4"),
    ({"lambda_mode": "bogus"}, "lambda_mode='bogus' is not one of"),
    ({"lambda_input": "y"}, "lambda_input='y' is not one of"),
    ({"head_dim": 7}, "must be divisible by head_dim=7"),
])
def test_a_refused_option_value_is_the_constructors_own_message(options, message):
    from mixerzoo.registry import RegistryError

    with pytest.raises(RegistryError) as e:
        mixerzoo.build_model("loglinear_adaptive", mixer_options=options)
    assert message in str(e.value) and "'loglinear_adaptive'" in str(e.value)
    assert "meta device" not in str(e.value)  # the constructor refused a value; no tensor was read
