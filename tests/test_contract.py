"""The public contract checks (mixerzoo.testing) on every registered mixer, on a mixer added
from outside the package, and on broken mixers that each must fail the property they break."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

import mixerzoo
from mixerzoo.mixers.base import Mixer
from mixerzoo.registry import REGISTRY
from mixerzoo.testing import PROPERTIES, MixerContractError, check_mixer, state_numel

# Read at collection time, so a mixer added to registry.yaml (or by an entry point) is checked
# without touching this file.
REGISTERED = mixerzoo.list_mixers()

NONFINITE = "causality_nonfinite"


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_mixer_honours_the_contract(name):
    check_mixer(name, skip=(NONFINITE,))


# No built-in mixer keeps non-finite future inputs out of the past today: the chunked paths
# multiply masked (zero) weights by future values (0 * inf = nan) and SDPA adds its -inf mask
# to the scores (nan + -inf = nan). Not strict, so a mixer that starts to guarantee it shows
# as XPASS; any other property failing here fails the test.
@pytest.mark.xfail(raises=MixerContractError, strict=False, reason="non-finite future inputs reach the past")
@pytest.mark.parametrize("name", REGISTERED)
def test_registered_mixer_nonfinite_future(name):
    try:
        check_mixer(name, skip=tuple(p for p in PROPERTIES if p not in ("module", NONFINITE)))
    except MixerContractError as e:
        assert e.property == NONFINITE, e
        raise


def test_registry_is_not_empty():
    assert REGISTERED, "the registry lists no mixers; the contract tests above checked nothing"


# --- a mixer from outside the package ------------------------------------------------------

USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo.mixers.base import Mixer


class DecayMixer(Mixer):
    """Per-channel exponential moving average of a projection, gated: [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model, *, layer_idx=0, decay=0.9):
        super().__init__(d_model, layer_idx)
        self.decay = decay
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        self.check_input(x)
        v, gate = self.in_proj(x).chunk(2, dim=-1)
        state = x.new_zeros(x.shape[0], self.d_model)
        ys = []
        for t in range(x.shape[1]):
            state = self.decay * state + v[:, t]
            ys.append(state)
        return self.out_proj(torch.stack(ys, dim=1) * F.silu(gate))

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, self.d_model, device=device, dtype=dtype)

    def step(self, x_t, state):
        v, gate = self.in_proj(x_t).chunk(2, dim=-1)
        state = self.decay * state + v
        return self.out_proj(state * F.silu(gate)), state

    def state_size(self, seq_len):
        return self.d_model
'''


@pytest.fixture
def user_mixer(tmp_path, monkeypatch):
    """A mixer in a module file of its own, registered through a registry YAML; both removed
    afterwards so that no other test sees them."""
    module = "contract_user_mixer"
    name = "contract_user_decay"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "mixers.yaml").write_text(
        f"{name}:\n  class: {module}:DecayMixer\n  options: {{decay: 0.8}}\n  summary: gated EMA\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert name not in mixerzoo.list_mixers()
    try:
        assert mixerzoo.load_registry(tmp_path / "mixers.yaml") == [name]
        yield name
    finally:
        REGISTRY.remove(name)
        sys.modules.pop(module, None)


def test_user_mixer_from_a_yaml_registry(user_mixer):
    model = mixerzoo.build_model(user_mixer, size="tiny", vocab_size=64)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    assert model(ids).logits.shape == (2, 7, 64)
    check_mixer(user_mixer)  # every property, the non-finite future included: an EMA keeps it
    cls = type(model.blocks[0].mixer)
    check_mixer(cls, options={"decay": 0.5})
    check_mixer(lambda d, i: cls(d, layer_idx=i))


def test_user_mixer_is_gone_afterwards():
    assert "contract_user_decay" not in mixerzoo.list_mixers()
    assert "contract_user_mixer" not in sys.modules


# --- broken mixers fail with the property they break ----------------------------------------


class _Linear(Mixer):
    """A per-token projection with a working decoding contract, for the broken variants."""

    def __init__(self, d_model, *, layer_idx=0):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.proj(x)

    def init_state(self, batch, device, dtype):
        return None

    def step(self, x_t, state):
        return self.proj(x_t), state

    def state_size(self, seq_len):
        return 0


class ReversedCumsum(_Linear):
    """Each output sums the inputs from its position to the end: it sees the future."""

    def forward(self, x):
        return self.proj(x.flip(1).cumsum(1).flip(1))


class DropsLastToken(_Linear):
    def forward(self, x):
        return self.proj(x[:, :-1])


class DoublesWidth(_Linear):
    def forward(self, x):
        return torch.cat([self.proj(x), x], dim=-1)


class StepForgetsTheBias(_Linear):
    def step(self, x_t, state):
        return x_t @ self.proj.weight.T, state


class PrefillSkipsTheState(_Linear):
    """Causal and stepped correctly, but its prefill ignores the tokens before it."""

    def forward(self, x):
        return self.proj(x.cumsum(1))

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, self.d_model, device=device, dtype=dtype)

    def step(self, x_t, state):
        state = state + x_t
        return self.proj(state), state

    def prefill(self, x, state):
        return self.proj(x.cumsum(1)), state + x.sum(1)

    def state_size(self, seq_len):
        return self.d_model


class StateSizeUndercounts(PrefillSkipsTheState):
    def prefill(self, x, state):
        return Mixer.prefill(self, x, state)

    def state_size(self, seq_len):
        return 0


class NotAModule:
    def __init__(self, d_model, *, layer_idx=0):
        self.d_model = d_model

    def __call__(self, x):
        return x


class ReadsValuesInInit(_Linear):
    """Chooses its width from a tensor's value: impossible on the meta device."""

    def __init__(self, d_model, *, layer_idx=0):
        super().__init__(d_model, layer_idx=layer_idx)
        scale = torch.ones(()).item()
        self.proj.weight.data.mul_(scale)


class UnusedParameter(_Linear):
    def __init__(self, d_model, *, layer_idx=0):
        super().__init__(d_model, layer_idx=layer_idx)
        self.spare = nn.Parameter(torch.zeros(d_model))


class NanGradient(_Linear):
    def forward(self, x):
        # sqrt at 0 has an infinite derivative; the forward values stay finite
        return self.proj(x) + torch.sqrt(self.proj.bias * 0).sum()


class NormedDropsTheGain(_Linear):
    def forward_normed(self, x, norm):
        # a fused norm that forgot the norm's learned gain
        return self(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


@pytest.mark.parametrize(
    "cls, prop, match",
    [
        (ReversedCumsum, "causality", "changed the outputs before"),
        (DropsLastToken, "shape", r"to \[2, 22, 32\]"),
        (DoublesWidth, "shape", r"to \[2, 23, 64\]"),
        (StepForgetsTheBias, "step", "steps from init_state vs forward"),
        (PrefillSkipsTheState, "prefill", r"prefill of x\[:, 9:\] after a prefill of 9 tokens"),
        (StateSizeUndercounts, "state_size", "state_size.*holds 32 elements"),
        (NotAModule, "module", "nn.Module"),
        (ReadsValuesInInit, "meta", "meta device"),
        (UnusedParameter, "gradients", "spare"),
        (NanGradient, "gradients", "non-finite"),
        (NormedDropsTheGain, "forward_normed", "differs from forward"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_broken_mixer_fails_its_property(cls, prop, match):
    with pytest.raises(MixerContractError, match=match) as e:
        check_mixer(cls)
    assert e.value.property == prop
    assert str(e.value).startswith(f"{prop}: ")
    assert isinstance(e.value, AssertionError)  # pytest reports it as a test failure


def test_a_plain_module_without_forward_normed_passes():
    # any causal nn.Module is a mixer; the block calls it on the normed input itself
    class Plain(nn.Module):
        def __init__(self, d_model, layer_idx=0):
            super().__init__()
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, x):
            return self.proj(x)

    with pytest.warns(UserWarning, match="decoding checks .* were skipped"):
        check_mixer(Plain)


def test_a_plain_callable_factory():
    with pytest.raises(MixerContractError) as e:
        check_mixer(lambda d, i: ReversedCumsum(d, layer_idx=i))
    assert e.value.property == "causality"
    check_mixer(lambda d, i: _Linear(d, layer_idx=i))


def test_nonfinite_future_is_checked():
    with pytest.raises(MixerContractError, match="non-finite") as e:
        check_mixer(ReversedCumsum, skip=("causality",))
    assert e.value.property == NONFINITE


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_mixer(_Linear)
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        check_mixer(_Linear, split=23)
    with pytest.raises(ValueError, match="skip"):
        check_mixer(_Linear, skip=("no_such_property",))
    with pytest.raises(TypeError, match="callable"):
        check_mixer(42)


def test_state_numel_counts_nested_states():
    from dataclasses import dataclass

    @dataclass
    class State:
        conv: torch.Tensor
        seq: tuple

    shared = torch.zeros(2, 5)
    state = State(torch.zeros(2, 3, 4), (shared, shared, 7, None, {"cache": [torch.zeros(2, 1)]}))
    assert state_numel(state, batch=2) == 12 + 5 + 1  # one tensor object counted once
    with pytest.raises(ValueError, match="multiple of the batch"):
        state_numel(torch.zeros(3), batch=2)
