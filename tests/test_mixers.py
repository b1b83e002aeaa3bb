"""Mixer contract: shapes, causality, decoding = forward, state sizes, options, backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.mixers.base import Mixer
from mixerzoo.mixers.linear import LinearAttention
from mixerzoo.mixers.loglinear import LAMBDA_MODES, LogLinearMamba2
from mixerzoo.mixers.mamba2 import Mamba2
from mixerzoo.mixers.softmax import SoftmaxAttention
from mixerzoo.ops.external import load_fla_chunk_linear_attn, load_mamba_chunk_scan_combined, optional
from mixerzoo.ops.loglinear import log_linear_attn, resolve_backend
from mixerzoo.ops.ssd import ssd_chunked
from tests.utils import assert_close, rel_err

D_MODEL = 32
SSM = dict(d_state=16, head_dim=16, chunk_size=16)

# Tiny configurations covering every class, λ mode and the option branches that change math.
FACTORIES = {
    "softmax": lambda: SoftmaxAttention(D_MODEL, head_dim=16),
    "softmax-gqa-qknorm": lambda: SoftmaxAttention(
        64, head_dim=16, num_kv_heads=2, qk_norm=True, bias=True
    ),
    "linear-elu": lambda: LinearAttention(D_MODEL, head_dim=16, chunk_size=16, backend="torch"),
    "linear-relu-nonorm": lambda: LinearAttention(
        D_MODEL, head_dim=16, feature_map="relu", output_norm=False, backend="torch"
    ),
    "linear-identity-naive": lambda: LinearAttention(
        D_MODEL, head_dim=16, feature_map="identity", backend="naive"
    ),
    "mamba2": lambda: Mamba2(D_MODEL, backend="torch", **SSM),
    "mamba2-g2-normfirst": lambda: Mamba2(
        D_MODEL, ngroups=2, norm_before_gate=True, bias=True, d_conv=3, backend="torch", **SSM
    ),
    "mamba2-naive": lambda: Mamba2(D_MODEL, backend="naive", **SSM),
    **{
        f"loglinear-{mode}": (
            lambda mode=mode: LogLinearMamba2(
                D_MODEL, lambda_mode=mode, lambda_hidden=16, backend="torch", **SSM
            )
        )
        for mode in LAMBDA_MODES
    },
    # A λ table shorter than the sequence: levels above the table reuse its top level.
    "loglinear-mlp-3levels-g2": lambda: LogLinearMamba2(
        D_MODEL, lambda_mode="mlp", max_levels=3, ngroups=2, backend="torch", **SSM
    ),
}


def make(name: str, seed: int = 0) -> Mixer:
    """Build a mixer and move every parameter off its init, so that zero-initialised parts
    (the λ MLP's output layer) take part in the tests."""
    torch.manual_seed(seed)
    mixer = FACTORIES[name]()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer.eval()


def inputs(T: int, d: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))


def state_numel(state) -> int:
    """Elements held by a decoding state, per sequence (batch of 2)."""
    tensors = []

    def collect(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif obj is None or isinstance(obj, int):
            return
        elif hasattr(obj, "__dataclass_fields__"):
            for field in obj.__dataclass_fields__:
                collect(getattr(obj, field))
        elif isinstance(obj, tuple):
            for item in obj:
                collect(item)
        else:
            raise TypeError(f"unexpected state part {type(obj).__name__}")

    collect(state)
    return sum(t.numel() for t in tensors) // 2


NAMES = sorted(FACTORIES)


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_causality(name):
    mixer = make(name)
    d = mixer.d_model
    x = inputs(40, d)
    with torch.no_grad():
        y = mixer(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        for t in (0, 17, 38):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
            y2 = mixer(x2)
            assert torch.allclose(y2[:, : t + 1], y[:, : t + 1], atol=1e-5, rtol=0), (
                f"output up to {t} changed when only later inputs changed"
            )
            assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("name", NAMES)
def test_steps_match_forward(name):
    mixer = make(name)
    x = inputs(29, mixer.d_model)
    with torch.no_grad():
        y = mixer(x)
        state = mixer.init_state(2, x.device, x.dtype)
        ys = []
        for t in range(x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            ys.append(y_t)
    assert_close("steps vs forward", y, torch.stack(ys, dim=1), 1e-4)
    assert state_numel(state) == mixer.state_size(29)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_steps_and_prefill(name):
    mixer = make(name)
    x = inputs(40, mixer.d_model)
    a = 27
    with torch.no_grad():
        y = mixer(x)
        state0 = mixer.init_state(2, x.device, x.dtype)
        y_a, state = mixer.prefill(x[:, :a], state0)
        assert state_numel(state) == mixer.state_size(a)
        assert_close("prefill vs forward", y[:, :a], y_a, 1e-4)
        # Two prefills in a row: the parallel path continuing from a state.
        y_b, state_b = mixer.prefill(x[:, a:], state)
        assert_close("prefill from a state", y[:, a:], y_b, 1e-4)
        assert state_numel(state_b) == mixer.state_size(40)
        ys = []
        for t in range(a, x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            ys.append(y_t)
    assert_close("prefill + steps", y[:, a:], torch.stack(ys, dim=1), 1e-4)


def test_state_size_values():
    sm = SoftmaxAttention(64, head_dim=16, num_kv_heads=2)
    assert sm.state_size(100) == 2 * 100 * 2 * 16
    assert LinearAttention(64, head_dim=16).state_size(100) == 4 * 16 * 16
    m2 = Mamba2(32, d_state=16, head_dim=16, d_conv=4, expand=2)
    conv = (64 + 2 * 16) * 3
    assert m2.state_size(1) == m2.state_size(10_000) == conv + 4 * 16 * 16
    ll = LogLinearMamba2(32, d_state=16, head_dim=16, d_conv=4, expand=2)
    # One level state per bit of T: 100 = 0b1100100 -> 7 levels, 2048 -> 12.
    assert ll.state_size(100) == conv + 7 * 4 * 16 * 16
    assert ll.state_size(2048) == conv + 12 * 4 * 16 * 16


@pytest.mark.parametrize(
    "cls", [SoftmaxAttention, LinearAttention, Mamba2, LogLinearMamba2], ids=lambda c: c.__name__
)
def test_unknown_option_is_a_type_error(cls):
    with pytest.raises(TypeError):
        cls(32, head_dim=16, no_such_option=1)
    with pytest.raises(TypeError):
        cls(32, 16)  # options are keyword-only


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SoftmaxAttention(48, head_dim=32), "divisible"),
        (lambda: SoftmaxAttention(64, head_dim=16, num_kv_heads=3), "num_kv_heads"),
        (lambda: SoftmaxAttention(64, head_dim=15), "even"),
        (lambda: LinearAttention(48, head_dim=32), "divisible"),
        (lambda: LinearAttention(32, head_dim=16, feature_map="cosine"), "feature_map"),
        (lambda: LinearAttention(32, head_dim=16, backend="cuda"), "backend"),
        (lambda: Mamba2(24, head_dim=16, expand=1), "divisible"),
        (lambda: Mamba2(32, head_dim=16, ngroups=3), "ngroups"),
        (lambda: Mamba2(32, head_dim=16, dt_min=0.2, dt_max=0.1), "dt_min"),
        (lambda: Mamba2(32, head_dim=16, A_init_range=(0, 4)), "A_init_range"),
        (lambda: Mamba2(32, head_dim=16, d_state=0), "d_state"),
        (lambda: Mamba2(32, head_dim=16, backend="fast"), "backend"),
        (lambda: LogLinearMamba2(32, head_dim=16, lambda_mode="learned"), "lambda_mode"),
        (lambda: LogLinearMamba2(32, head_dim=16, max_levels=0), "max_levels"),
        (lambda: LogLinearMamba2(32, head_dim=16, lambda_hidden=0), "lambda_hidden"),
        (lambda: LogLinearMamba2(32, head_dim=16, lambda_act="swish"), "lambda_act"),
        (lambda: LogLinearMamba2(32, head_dim=20), "divisible"),
    ],
)
def test_bad_option_values_are_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_wrong_input_shape_is_rejected():
    mixer = Mamba2(32, backend="torch", **SSM)
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        mixer(torch.randn(2, 5, 16))


@pytest.mark.parametrize("name", ["linear-elu", "mamba2"] + [f"loglinear-{m}" for m in LAMBDA_MODES])
def test_torch_and_naive_backends_agree(name):
    mixer = make(name)
    x = inputs(50, mixer.d_model)
    with torch.no_grad():
        y_torch = mixer(x)
        assert mixer.last_backend == "torch"
        mixer.backend = "naive"
        y_naive = mixer(x)
        assert mixer.last_backend == "naive"
    assert_close("torch vs naive", y_naive, y_torch, 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_backend_choice_on_cpu():
    x = inputs(5, 32)
    for cls in (LinearAttention, Mamba2):
        auto = cls(32, head_dim=16)
        auto(x)
        assert auto.last_backend == "torch"
        forced = cls(32, head_dim=16, backend="triton")
        with pytest.raises(RuntimeError, match="CUDA"):
            forced(x)
    sm = SoftmaxAttention(32, head_dim=16)
    sm(x)
    assert sm.last_backend == "sdpa"


def test_gradients_reach_every_parameter():
    for mode in LAMBDA_MODES:
        mixer = make(f"loglinear-{mode}")
        mixer(inputs(20, D_MODEL)).square().sum().backward()
        for pname, p in mixer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{mode}: no gradient for {pname}"


def test_lambda_modes_shapes_and_init():
    H, L = 4, 15
    u = inputs(9, D_MODEL)
    for mode in LAMBDA_MODES:
        torch.manual_seed(0)
        mixer = LogLinearMamba2(D_MODEL, lambda_mode=mode, **SSM)
        assert mixer.nheads == H
        zxbcdt = mixer.in_proj(u)
        extra = mixer._split(zxbcdt)[3]
        lam = mixer._lambda(u, extra)
        if mode == "fixed":
            assert lam.shape == (1, 1, H, L)  # a broadcast, not a [B, T, H, L] tensor
        else:
            assert lam.shape == (2, 9, H, L)
        assert (lam > 0).all()
        if mode == "linear":
            assert extra.shape[-1] == H * L
            assert mixer.in_proj.out_features == Mamba2(D_MODEL, **SSM).in_proj.out_features + H * L
        else:
            assert extra is None
            # Every mode but linear starts at λ ≡ 1, i.e. as Mamba-2.
            torch.testing.assert_close(lam, torch.ones_like(lam), rtol=1e-6, atol=1e-6)
        no_wd = {n for n, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
        assert {"A_log", "D", "dt_bias"} <= no_wd
        assert any(n.startswith("lambda_") for n in no_wd), f"{mode}: λ params decay"


def test_mamba2_init():
    torch.manual_seed(0)
    m = Mamba2(256, head_dim=16, dt_min=0.001, dt_max=0.1, A_init_range=(1, 16))
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(m.D.detach(), torch.ones(m.nheads))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_loglinear_with_unit_lambda_is_mamba2(ngroups):
    torch.manual_seed(0)
    mamba = Mamba2(D_MODEL, ngroups=ngroups, backend="torch", **SSM)
    with torch.no_grad():
        for p in mamba.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loglinear = LogLinearMamba2(
        D_MODEL, ngroups=ngroups, lambda_mode="mlp", backend="torch", **SSM
    )
    missing, unexpected = loglinear.load_state_dict(mamba.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("lambda_") for k in missing)
    x = inputs(70, D_MODEL)
    with torch.no_grad():
        assert_close("λ ≡ 1 log-linear vs Mamba-2", mamba(x), loglinear(x), 1e-5)
        # and once λ moves away from 1, the two differ
        loglinear.lambda_fc2.bias.add_(1.0)
        assert rel_err(loglinear(x), mamba(x)) > 1e-3


@pytest.mark.parametrize("T,G", [(1, 1), (33, 1), (70, 4)])
def test_log_linear_attn_unit_lambda_is_ssd(T, G):
    """DESIGN identity: λ ≡ 1 gives Mamba-2 SSD exactly (q = C, k = B, v = x·dt, g = A·dt)."""
    gen = torch.Generator().manual_seed(T)
    B_, H, P, N = 2, 4, 8, 6
    x = torch.randn(B_, T, H, P, generator=gen)
    dt = F.softplus(torch.randn(B_, T, H, generator=gen) - 1)
    A = -torch.exp(0.5 * torch.randn(H, generator=gen))
    Bm = torch.randn(B_, T, G, N, generator=gen)
    Cm = torch.randn(B_, T, G, N, generator=gen)
    y_ssd, h_ssd = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=16, output_final_state=True)
    lam = torch.ones(1, 1, H, 5)
    y_ll, state = log_linear_attn(
        Cm, Bm, x * dt[..., None], A * dt, lam, scale=1.0, output_final_state=True, backend="torch"
    )
    assert_close("log-linear (λ ≡ 1) vs SSD", y_ssd, y_ll, 1e-5)
    # The SSD state is the sum of the Fenwick level states (all decayed to the last token).
    h_ll = state.levels.sum(dim=2).transpose(-1, -2)  # [B, H, K, V] -> [B, H, P, N]
    assert_close("summed level states vs SSD state", h_ssd, h_ll, 1e-5)
    assert state.offset == T
    assert state.levels.shape[2] == T.bit_length()


# --- GPU: the kernel paths (skipped without CUDA) ---------------------------------------------

def _loglinear_triton_available() -> bool:
    return resolve_backend("auto", torch.device("cuda")) == "triton"


GPU_KERNELS = {
    "linear": (
        lambda b: LinearAttention(64, head_dim=16, backend=b),
        lambda: optional(load_fla_chunk_linear_attn) is not None,
        "fla",
    ),
    "mamba2": (
        lambda b: Mamba2(64, backend=b, **SSM),
        lambda: optional(load_mamba_chunk_scan_combined) is not None,
        "mamba_ssm",
    ),
    "loglinear": (
        lambda b: LogLinearMamba2(64, lambda_mode="mlp", backend=b, **SSM),
        _loglinear_triton_available,
        "triton",
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(GPU_KERNELS))
def test_gpu_kernel_matches_torch(family):
    build, available, ran = GPU_KERNELS[family]
    if not available():
        pytest.skip(f"the {family} GPU kernel is not installed")
    torch.manual_seed(0)
    mixer = build("auto").cuda()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    y = mixer(x)
    assert mixer.last_backend == ran
    y.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in mixer.parameters()]
    x.grad = None
    mixer.zero_grad()
    mixer.backend = "torch"
    y_ref = mixer(x)
    y_ref.square().sum().backward()
    ref_grads = [x.grad] + [p.grad for p in mixer.parameters()]
    # fp32 kernels may use TF32 dots: compare at TF32 precision.
    assert_close(f"{family} kernel vs torch", y_ref, y, 5e-3)
    for (pname, _), g, g_ref in zip([("x", None)] + list(mixer.named_parameters()), grads, ref_grads):
        assert_close(f"{family} grad of {pname}", g_ref, g, 5e-3)
    # The kernel continuing from a state (prefill) matches the torch path too.
    with torch.no_grad():
        state = mixer.init_state(2, "cuda", torch.float32)
        _, state = mixer.prefill(x[:, :37], state)
        mixer.backend = "auto"
        y_b, _ = mixer.prefill(x[:, 37:], state)
    assert_close(f"{family} kernel prefill from a state", y_ref[:, 37:].detach(), y_b, 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_runs_every_mixer(name):
    mixer = make(name).cuda()
    x = inputs(45, mixer.d_model).cuda()
    with torch.no_grad():
        y_cpu = make(name)(x.cpu())
        y = mixer(x)
        state = mixer.init_state(2, x.device, x.dtype)
        ys = []
        for t in range(x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            ys.append(y_t)
        y_bf16 = mixer.to(torch.bfloat16)(x.bfloat16())
    assert_close("cuda vs cpu", y_cpu, y.cpu(), 5e-3)
    assert_close("cuda steps vs forward", y, torch.stack(ys, dim=1), 5e-3)
    assert_close("bf16 vs fp32", y, y_bf16.float(), 5e-2)


# --- a missing optional kernel package keeps nothing alive ------------------------------------

def test_a_missing_kernel_package_keeps_no_caller_tensors_alive():
    """backend="auto" asks for the optional kernel on every forward. A cached import failure
    once kept its exception, whose traceback held every caller's frame and so a whole forward
    pass per step (a 125m model without fla grew by ~6 GiB per step on the GPU)."""
    import gc
    import weakref

    from mixerzoo.ops.external import _once

    @_once
    def loader():
        raise ImportError("the kernel package is not installed; use backend='torch'")

    refs = []

    def forward_like() -> None:
        activations = torch.empty(1000)
        refs.append(weakref.ref(activations))
        assert optional(loader) is None

    for _ in range(3):
        forward_like()
    with pytest.raises(ImportError, match="use backend='torch'"):
        loader()  # the explicit backend still says what to install, every time
    with pytest.raises(ImportError, match="use backend='torch'"):
        loader()
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
