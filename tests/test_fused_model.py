"""Whole models with the fused training ops against the plain torch code they replace.

Each fused op has its own test against its reference (test_norms, test_fused_elementwise,
test_cross_entropy); here a model built with ``kernels="fused"`` is run against its twin with
``kernels="reference"`` (the same weights), every op at once, so a wiring mistake (a wrong dtype, a dropped gate, a missed skip) shows as a loss or
gradient that differs. Also: the point-wise Functions of the mixers, the chunked loss
through ``forward``, activation checkpointing, and ``mixerzoo bench models`` on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

import mixerzoo
from mixerzoo.ops import pointwise
from tests.utils import assert_close, rel_err

BUILTINS = mixerzoo.list_mixers()  # every registered mixer, whatever their number


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = mixerzoo.build_model(name, size="tiny", vocab_size=97).train()
    # a nonzero λ MLP output layer, so the adaptive λ varies per token and its gradient path is live
    for block in model.blocks:
        fc2 = getattr(block.mixer, "lambda_fc2", None)
        if fc2 is not None:
            torch.nn.init.normal_(fc2.weight, std=0.3)
    return model


def _kernels(model, enabled: bool):
    """``model`` itself when it runs the wanted kernels, else its twin with the same weights."""
    kernels = "fused" if enabled else "reference"
    return model if model.kernels == kernels else model.with_kernels(kernels)


def _loss_and_grads(model, x, *, enabled, return_logits=True, autocast=False):
    model = _kernels(model, enabled)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, labels=x, return_logits=return_logits).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", BUILTINS)
def test_fused_model_matches_reference_fp32(name):
    model = _model(name)
    x = torch.randint(0, 97, (2, 37))  # T not a multiple of any chunk
    ref_loss, ref_grads = _loss_and_grads(model, x, enabled=False)
    loss, grads = _loss_and_grads(model, x, enabled=True, return_logits=False)
    assert_close("loss", ref_loss, loss, 1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert_close(n, ref_grads[n], grads[n], 1e-4)


@pytest.mark.parametrize("name", ["softmax", "loglinear_adaptive"])
def test_fused_model_matches_reference_under_bf16_autocast(name):
    model = _model(name)
    x = torch.randint(0, 97, (2, 24))
    ref_loss, ref_grads = _loss_and_grads(model, x, enabled=False, autocast=True)
    loss, grads = _loss_and_grads(model, x, enabled=True, return_logits=False, autocast=True)
    assert_close("loss", ref_loss, loss, 1e-2)
    for n in ref_grads:
        # bf16 rounding of small gradients differs by placement; the whole-model check is loose
        assert_close(n, ref_grads[n], grads[n], 5e-2)


def test_kernels_are_chosen_at_build_time_and_saved(tmp_path, monkeypatch):
    model = mixerzoo.build_model("mamba2", size="tiny")
    assert model.kernels == "fused" and model.blocks[0].mixer.norm.kernels == "fused"
    monkeypatch.setenv("MIXERZOO_FUSED", "0")  # only the default of models built from now on
    plain = mixerzoo.build_model("mamba2", size="tiny")
    assert model.kernels == "fused" and plain.kernels == "reference"
    assert {m.kernels for m in plain.modules() if hasattr(m, "kernels") and not callable(m.kernels)} == {"reference"}
    assert "kernels=reference" in repr(plain.blocks[0])
    plain.save_pretrained(tmp_path)
    monkeypatch.delenv("MIXERZOO_FUSED")
    assert mixerzoo.load_model(tmp_path).kernels == "reference"  # saved with the checkpoint
    with pytest.raises(ValueError, match="kernels must be one of"):
        mixerzoo.build_model("mamba2", size="tiny", kernels="triton")
    with pytest.raises(ValueError, match="kernels='reference' is a model option"):
        mixerzoo.build_model("mamba2", size="tiny", mixer_options={"kernels": "reference"})
    twin = model.with_kernels("reference")
    assert twin.kernels == "reference" and model.kernels == "fused"
    for (n, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), n


def test_chunked_loss_through_forward():
    model = _model("mamba2").eval()
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        full = model(x, labels=x)
        chunked = model(x, labels=x, return_logits=False)
    assert chunked.logits is None and full.logits.shape == (3, 11, 97)
    assert_close("loss", full.loss, chunked.loss, 1e-5)
    with pytest.raises(ValueError, match="only makes sense with labels"):
        model(x, return_logits=False)
    with pytest.raises(ValueError, match="must have the shape of input_ids"):
        model(x, labels=x[:, :5])


def test_activation_checkpointing_identical_loss_and_grads():
    model = _model("loglinear_adaptive")
    x = torch.randint(0, 97, (2, 21))
    ref_loss, ref_grads = _loss_and_grads(model, x, enabled=True, return_logits=False)
    model.set_activation_checkpointing(True)
    loss, grads = _loss_and_grads(model, x, enabled=True, return_logits=False)
    assert torch.equal(loss, ref_loss)
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=0, atol=1e-7), n
    # and it really recomputes: fewer tensors are kept for backward
    model.zero_grad(set_to_none=True)

    def saved_bytes(ckpt):
        model.set_activation_checkpointing(ckpt)
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x, return_logits=False).loss
        return sum(total)

    assert saved_bytes(True) < saved_bytes(False) / 2


# --- point-wise Functions ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mul_dt_matches_reference(dtype):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, 4, dtype=dtype, requires_grad=True)
    dt = torch.rand(2, 5, 3, requires_grad=True)
    ref = (x.float() * dt[..., None]).to(dtype)
    got = pointwise.mul_dt(x, dt)
    assert got.dtype == dtype
    assert_close("v", ref, got, 1e-6)
    g = torch.randn_like(ref)
    rx, rdt = torch.autograd.grad(ref, (x, dt), g)
    gx, gdt = torch.autograd.grad(got, (x, dt), g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("dx", rx, gx, tol)
    assert_close("ddt", rdt, gdt, tol)
    with pytest.raises(ValueError, match="must agree"):
        pointwise.mul_dt(x, dt[:, :4])


def test_softplus_returns_dtype_and_grad():
    x = torch.randn(7, 5, dtype=torch.bfloat16, requires_grad=True)
    y = pointwise.softplus(x)
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.softplus(x.float())
    assert_close("softplus", ref, y, 1e-2)
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert_close("dsoftplus", torch.sigmoid(x.float()), gx, 1e-2)


@pytest.mark.parametrize("start", [0, 13])
def test_rope_function_matches_reference_and_saves_no_activation(start):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    ref = pointwise.apply_rope_reference(x, start, 10000.0)
    got = pointwise.apply_rope(x, start, 10000.0)
    assert_close("rope", ref, got, 1e-6)
    g = torch.randn_like(ref)
    assert_close("drope", torch.autograd.grad(ref, x, g)[0], torch.autograd.grad(got, x, g)[0], 1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        pointwise.apply_rope(x, start, 10000.0)
    assert all(tuple(s) == (9, 8) for s in saved), saved  # the angle tables only


# --- the model benchmark on the CPU ----------------------------------------------------------------

def test_bench_models_smoke_on_cpu(tmp_path, capsys):
    from mixerzoo.cli import main

    out = tmp_path / "bm"
    rc = main(["bench", "models", "--device", "cpu", "--size", "tiny", "--mixers", "softmax,loglinear_adaptive",
               "--seq-lens", "16,32", "--tokens", "64", "--steps", "1", "--warmup", "1", "--precision", "fp32",
               "--anchors", "none", "--profile", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "models.json").read_text())
    assert result["complete"]
    rows = result["rows"]
    assert [(r["model"], r["T"], r["B"]) for r in rows] == [
        ("softmax", 16, 4), ("loglinear_adaptive", 16, 4), ("softmax", 32, 2), ("loglinear_adaptive", 32, 2)]
    for r in rows:
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["step_ms"] > 0 and r["params"] > 0
        assert r["profile"]["gpu_ms"] > 0 and (out / r["profile"]["trace"]).is_file()
    assert (out / "models.png").is_file()
    table = (out / "models.md").read_text()
    assert "| loglinear_adaptive |" in table and "T=0K" not in table or "tok/s" in table
    printed = capsys.readouterr().out
    assert "softmax" in printed and "ms / layer" in printed


def test_bench_models_rejects_bad_input():
    from mixerzoo.bench.models import ModelBenchConfig

    with pytest.raises(ValueError, match="unknown mixers"):
        ModelBenchConfig(mixers=["nope"], device="cpu")
    with pytest.raises(ValueError, match="multiple of every T"):
        ModelBenchConfig(seq_lens=[3000], device="cpu")
    with pytest.raises(ValueError, match="unknown anchors"):
        ModelBenchConfig(anchors=["x"], device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", BUILTINS)
def test_fused_model_matches_reference_on_gpu(name):
    """The Triton paths of every fused op in a 125m-wide model under bf16 autocast.

    Both bf16 paths are judged against the plain path in fp32: two bf16 runs differ from each
    other by about the sum of their rounding errors (4e-2 on a bias gradient summed over 2,000
    tokens was seen), so the fused one may be at most twice as far from fp32 as the plain one.
    """
    torch.manual_seed(0)
    model = mixerzoo.build_model(name, size="125m", vocab_size=32000).cuda().train()
    for block in model.blocks[:2]:
        fc2 = getattr(block.mixer, "lambda_fc2", None)
        if fc2 is not None:
            torch.nn.init.normal_(fc2.weight, std=0.05)
    model.blocks = model.blocks[:2]  # two layers are enough to exercise every op
    x = torch.randint(0, 32000, (2, 1000), device="cuda")  # T not a multiple of 64

    plain = model.with_kernels("reference")

    def run(enabled, bf16=True):
        m = model if enabled else plain
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = m(input_ids=x, labels=x, return_logits=enabled is False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    exact_loss, exact = run(False, bf16=False)
    ref_loss, ref = run(False)
    loss, got = run(True)
    assert_close("loss", exact_loss, loss, 2 * rel_err(ref_loss, exact_loss) + 1e-3)
    assert got.keys() == exact.keys()
    for n in exact:
        assert_close(n, exact[n], got[n], 2 * rel_err(ref[n], exact[n]) + 5e-3)


# --- fusions across op boundaries ---------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nbg", [False, True])
def test_gated_norm_linear_matches_norm_then_linear(backend, nbg):
    from mixerzoo.ops.norms import gated_rms_norm_linear, gated_rms_norm_reference

    torch.manual_seed(3)
    y = torch.randn(2, 7, 48, requires_grad=True)
    z = torch.randn(2, 7, 48, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48)).requires_grad_()
    p = torch.randn(20, 48, requires_grad=True)
    ref = torch.nn.functional.linear(gated_rms_norm_reference(y, z, w, 24, nbg), p)
    got = gated_rms_norm_linear(y, z, w, p, group_size=24, norm_before_gate=nbg, backend=backend)
    assert_close("out", ref, got, 1e-5)
    g = torch.randn_like(ref)
    for name, a, b in zip("yzwp", torch.autograd.grad(ref, (y, z, w, p), g), torch.autograd.grad(got, (y, z, w, p), g)):
        assert_close(f"d{name}", a, b, 1e-5)
    with pytest.raises(ValueError, match="proj_weight must be"):
        gated_rms_norm_linear(y, z, w, p[:, :40], group_size=24)


def test_gated_norm_linear_keeps_no_norm_output():
    from mixerzoo.ops.norms import gated_rms_norm_linear

    y, z = (torch.randn(64, 32, requires_grad=True) for _ in range(2))
    w, p = torch.ones(32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        gated_rms_norm_linear(y, z, w, p, group_size=32, backend="torch")
    inputs = {t.untyped_storage().data_ptr() for t in (y, z, w, p)}
    assert len(set(saved) - inputs) == 1  # rstd, nothing of size [64, 32] besides the inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_v_scale_matches_premultiplied_values(dtype):
    """The Triton op forming v = x·dt itself (and again in backward) equals passing x·dt."""
    from mixerzoo.ops.loglinear.triton_ops import triton_log_linear_attn

    torch.manual_seed(4)
    B, T, H, K, V = 2, 70, 2, 16, 16
    q = torch.randn(B, T, 1, K, dtype=dtype, requires_grad=True)
    k = (torch.randn(B, T, 1, K) / 4).to(dtype).requires_grad_()
    x = torch.randn(B, T, H, V, dtype=dtype, requires_grad=True)
    dt = torch.rand(B, T, H, requires_grad=True)
    g = (-torch.rand(B, T, H) * 0.1).requires_grad_()
    lam = torch.nn.functional.softplus(torch.randn(B, T, H, 8)).to(dtype).requires_grad_()
    ref = triton_log_linear_attn(q, k, pointwise.mul_dt(x, dt), g, lam, 0.5, 16, 2)
    got = triton_log_linear_attn(q, k, x, g, lam, 0.5, 16, 2, v_scale=dt)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("o", ref, got, tol)
    do = torch.randn_like(ref)
    inputs = (q, k, x, dt, g, lam)
    for name, a, b in zip(("q", "k", "x", "dt", "g", "lam"), torch.autograd.grad(ref, inputs, do),
                          torch.autograd.grad(got, inputs, do)):
        assert_close(f"d{name}", a, b, tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rms_norm_linear_matches_norm_then_linear(backend):
    from mixerzoo.ops.norms import rms_norm_linear, rms_norm_reference

    torch.manual_seed(5)
    x = torch.randn(3, 5, 40, requires_grad=True)
    w = (1 + 0.1 * torch.randn(40)).requires_grad_()
    p = torch.randn(24, 40, requires_grad=True)
    ref = torch.nn.functional.linear(rms_norm_reference(x, w), p)
    got = rms_norm_linear(x, w, p, backend=backend)
    assert_close("out", ref, got, 1e-5)
    g = torch.randn_like(ref)
    for name, a, b in zip("xwp", torch.autograd.grad(ref, (x, w, p), g), torch.autograd.grad(got, (x, w, p), g)):
        assert_close(f"d{name}", a, b, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 residual, bf16 product
        out = rms_norm_linear(x, w, p, out_dtype=torch.bfloat16, backend=backend)
    assert out.dtype == torch.bfloat16
    assert_close("autocast out", ref, out, 1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_rows_matches_reference(backend, per_row, dtype):
    torch.manual_seed(6)
    wide = torch.randn(3, 5, 2 * 16 + 7, dtype=dtype)  # x is a view into a wider tensor
    x = wide[..., :32].unflatten(-1, (2, 16)).requires_grad_()
    s = (torch.rand(3, 5, 2) if per_row else torch.rand(2)).requires_grad_()
    add = torch.randn(3, 5, 2, 16, dtype=dtype, requires_grad=True)
    sb = s[..., None] if per_row else s[:, None]
    ref = (add.float() + x.float() * sb).to(dtype)
    got = pointwise.scale_rows(x, s, add, backend=backend)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype
    assert_close("y", ref, got, tol)
    g = torch.randn_like(ref)
    for name, a, b in zip(("x", "s", "add"), torch.autograd.grad(ref, (x, s, add), g),
                          torch.autograd.grad(got, (x, s, add), g)):
        assert_close(f"d{name}", a, b, 1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="scale_rows"):
        pointwise.scale_rows(x, s[:1] if not per_row else s[:, :1])


def test_every_triton_kernel_inside_a_model_matches_the_plain_model(monkeypatch):
    """The model layouts (views into in_proj outputs, the residual stream, tied head) through
    every Triton kernel at once: on a CPU they run in the interpreter, forced here, in fp32."""
    import functools

    from mixerzoo.ops import conv, cross_entropy, norms, swiglu

    for mod, names in ((norms, ["rms_norm", "rms_norm_linear", "gated_rms_norm", "gated_rms_norm_linear"]),
                       (conv, ["causal_conv1d"]), (swiglu, ["swiglu_linear"]),
                       (cross_entropy, ["linear_cross_entropy"])):
        for n in names:
            monkeypatch.setattr(mod, n, functools.partial(getattr(mod, n), backend="triton"))
    monkeypatch.setattr(pointwise, "_use_kernel", lambda backend, *ts: True)
    torch.manual_seed(0)
    model = _model("loglinear_adaptive")
    plain = mixerzoo.build_model("loglinear_adaptive", size="tiny", vocab_size=97,
                                 mixer_options={"backend": "torch"}).train()
    plain.load_state_dict(model.state_dict())
    for block in model.blocks:
        block.mixer.backend = "triton"
    x = torch.randint(0, 97, (2, 45))  # T over a 32-row chunk, not a multiple of it
    ref_loss, ref_grads = _loss_and_grads(plain, x, enabled=False)
    loss, grads = _loss_and_grads(model, x, enabled=True, return_logits=False)
    assert set(model.backends().values()) == {"triton"}
    assert_close("loss", ref_loss, loss, 1e-5)
    for n in ref_grads:
        assert_close(n, ref_grads[n], grads[n], 2e-4)


def test_softplus_gradient_from_its_output_is_exact_in_fp32():
    x = torch.tensor([-40.0, -5.0, -0.3, 0.0, 0.7, 6.0, 30.0], requires_grad=True)
    (g,) = torch.autograd.grad(pointwise.softplus(x).sum(), x)
    assert_close("dsoftplus", torch.sigmoid(x.detach()), g, 1e-6)


def test_reference_kernels_keep_forward_hooks_and_user_kernel_options():
    # the block reaches the mixer through __call__ whatever the kernels (hooks, compiled modules)
    model = mixerzoo.build_model("mamba2", size="tiny", kernels="reference")
    seen = []
    model.blocks[0].mixer.register_forward_hook(lambda *a: seen.append(1))
    model(torch.randint(0, 100, (1, 9)))
    assert seen == [1]
    # a user mixer's own option that happens to be called `kernels` is left alone
    from torch import nn

    from mixerzoo.mixers.base import Mixer

    class Conv(Mixer):
        def __init__(self, d_model, *, layer_idx=0, kernels: int = 4):
            super().__init__(d_model, layer_idx=layer_idx)
            self.kernels_n = kernels
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, x):
            return self.proj(x)

    mixerzoo.register_mixer("kernels_probe", Conv, kernels=3, overwrite=True)
    try:
        built = mixerzoo.build_model("kernels_probe", size="tiny", kernels="reference")
        assert built.blocks[0].mixer.kernels_n == 3 and built.kernels == "reference"
    finally:
        from mixerzoo.registry import REGISTRY

        REGISTRY.remove("kernels_probe")
