"""Registry: built-ins, user YAML files, register_mixer, entry points, and the errors."""

from __future__ import annotations

import textwrap

import pytest
import torch

import mixerzoo
from mixerzoo.registry import REGISTRY, RegistryError, read_registry_file

# the names DESIGN.md promises; other tests iterate list_mixers()
BUILTINS = ["softmax", "linear", "mamba2", "loglinear_fixed", "loglinear", "loglinear_adaptive"]


@pytest.fixture
def clean_registry():
    before = set(REGISTRY.names())
    yield REGISTRY
    for name in set(REGISTRY.names()) - before:
        REGISTRY.remove(name)


def test_builtins_listed():
    assert set(BUILTINS) <= set(mixerzoo.list_mixers())


@pytest.mark.parametrize("name", mixerzoo.list_mixers())
def test_builtin_classes_import(name):
    spec = REGISTRY.get(name)
    cls = spec.resolve()
    assert isinstance(cls, type)


def test_unknown_mixer_suggests_and_lists():
    with pytest.raises(RegistryError) as e:
        mixerzoo.build_model("loglinear_adaptiv", size="tiny")
    msg = str(e.value)
    assert "did you mean" in msg.lower() and "loglinear_adaptive" in msg and "softmax" in msg


def test_unknown_size():
    with pytest.raises(ValueError, match="known sizes"):
        mixerzoo.build_model("softmax", size="huge")


def test_unknown_option_lists_accepted(clean_registry):
    mixerzoo.register_mixer("conv_typo", "tests.user_mixers:CausalConvMixer", kernal=3)
    with pytest.raises(RegistryError, match="kernal.*accepted.*kernel"):
        mixerzoo.build_model("conv_typo", size="tiny", vocab_size=64)


def test_bad_option_value_is_clear(clean_registry):
    mixerzoo.register_mixer("conv_bad", "tests.user_mixers:CausalConvMixer", kernel=0)
    with pytest.raises(ValueError, match="kernel must be >= 1"):
        mixerzoo.build_model("conv_bad", size="tiny", vocab_size=64)


def test_register_collision(clean_registry):
    with pytest.raises(RegistryError, match="collides"):
        mixerzoo.register_mixer("softmax", "tests.user_mixers:CausalConvMixer")


def test_register_class_object_builds(clean_registry):
    from tests.user_mixers import CausalConvMixer

    mixerzoo.register_mixer("conv_obj", CausalConvMixer, kernel=3)
    model = mixerzoo.build_model("conv_obj", size="tiny", vocab_size=64)
    assert model.blocks[0].mixer.kernel == 3


def test_user_yaml_builds_and_trains(tmp_path, clean_registry):
    path = tmp_path / "mine.yaml"
    path.write_text(textwrap.dedent("""
        conv4:
          class: tests.user_mixers:CausalConvMixer
          options: {kernel: 4}
          summary: a depthwise causal conv
    """))
    assert mixerzoo.load_registry(path) == ["conv4"]
    torch.manual_seed(0)
    model = mixerzoo.build_model("conv4", size="tiny", vocab_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # a deterministic pattern the conv can learn: next token = current token + 1 (mod 32)
    x = (torch.arange(16)[None] + torch.randint(0, 32, (8, 1))) % 32
    losses = []
    for _ in range(30):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_env_registry_file(tmp_path, monkeypatch):
    from mixerzoo.registry import Registry

    path = tmp_path / "env.yaml"
    path.write_text("envconv: tests.user_mixers:CausalConvMixer\n")
    monkeypatch.setenv("MIXERZOO_REGISTRY", str(path))
    reg = Registry()
    assert "envconv" in reg.names() and "softmax" in reg.names()


def test_entry_point(monkeypatch):
    from importlib import metadata

    from mixerzoo import registry

    ep = metadata.EntryPoint(name="epconv", value="tests.user_mixers:CausalConvMixer", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    reg = registry.Registry()
    assert reg.get("epconv").resolve().__name__ == "CausalConvMixer"


@pytest.mark.parametrize(
    "text, match",
    [
        ("a: {options: {}}\n", "needs 'class"),
        ("a: {class: x:Y, colour: red}\n", "unknown keys"),
        ("a: {class: x:Y, options: [1, 2]}\n", "'options' must be a mapping"),
        ("- a\n- b\n", "must map mixer names"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
    ids=["no-class", "unknown-key", "options-list", "list-file", "bad-yaml"],
)
def test_bad_yaml_entries(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=match):
        read_registry_file(path)


def test_unimportable_class(clean_registry):
    mixerzoo.register_mixer("ghost", "no_such_module_xyz:Ghost")
    with pytest.raises(RegistryError, match="cannot import module 'no_such_module_xyz'"):
        mixerzoo.build_model("ghost", size="tiny")


def test_env_registry_is_read_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "late.yaml"
    path.write_text("lateconv: tests.user_mixers:CausalConvMixer\n")
    assert "lateconv" not in mixerzoo.list_mixers()
    monkeypatch.setenv("MIXERZOO_REGISTRY", str(path))
    assert "lateconv" in mixerzoo.list_mixers()
    mixerzoo.build_model("lateconv", size="tiny", vocab_size=32)
    monkeypatch.delenv("MIXERZOO_REGISTRY")
    assert "lateconv" not in mixerzoo.list_mixers()


def test_missing_env_file_is_reported_every_time(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXERZOO_REGISTRY", str(tmp_path / "nope.yaml"))
    for _ in range(2):
        with pytest.raises(RegistryError, match="MIXERZOO_REGISTRY.*does not exist"):
            mixerzoo.list_mixers()


def test_broken_entry_point_hides_nothing_else(monkeypatch):
    from importlib import metadata

    from mixerzoo import registry

    eps = [
        metadata.EntryPoint(name="broken", value="no_such_pkg_xyz:Nope", group=registry.ENTRY_POINT_GROUP),
        metadata.EntryPoint(name="fine", value="tests.user_mixers:CausalConvMixer", group=registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: eps)
    reg = registry.Registry()
    assert {"softmax", "fine"} <= set(reg.names())
    with pytest.raises(RegistryError, match="broken.*failed to load"):
        reg.get("broken")


def test_class_defined_in_a_function_builds(clean_registry):
    from mixerzoo.mixers.base import Mixer

    class Local(Mixer):
        def __init__(self, d_model, *, layer_idx=0):
            super().__init__(d_model, layer_idx)
            self.proj = torch.nn.Linear(d_model, d_model)

        def forward(self, x):
            return self.proj(x)

    mixerzoo.register_mixer("local_cls", Local)
    model = mixerzoo.build_model("local_cls", size="tiny", vocab_size=32)
    assert model(torch.randint(0, 32, (1, 5))).logits.shape == (1, 5, 32)


def test_forwarded_kwargs_options_are_checked():
    with pytest.raises(RegistryError, match="bogus.*accepted.*d_state"):
        mixerzoo.build_model("loglinear_adaptive", size="tiny", mixer_options={"bogus": 1})


def test_load_registry_is_all_or_nothing(tmp_path, clean_registry):
    path = tmp_path / "half.yaml"
    path.write_text("first_ok: tests.user_mixers:CausalConvMixer\nsoftmax: tests.user_mixers:CausalConvMixer\n")
    with pytest.raises(RegistryError, match="collides"):
        mixerzoo.load_registry(path)
    assert "first_ok" not in mixerzoo.list_mixers()


def test_bad_registrations_fail_at_once(clean_registry):
    with pytest.raises(RegistryError, match="non-empty string"):
        mixerzoo.register_mixer("", "tests.user_mixers:CausalConvMixer")
    with pytest.raises(RegistryError, match="form 'package.module:Class'"):
        mixerzoo.register_mixer("x", "notapath")
