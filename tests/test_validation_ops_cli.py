"""Value checks of log_linear_attn (check_finite), causality with non-finite inputs, resets
(g = -inf), and the CLI's refusal of bad flags and output paths before any work starts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.cli import main
from mixerzoo.ops.loglinear import LogLinearState, chunked_log_linear_attn, log_linear_attn
from tests.utils import assert_close

NAN, INF = float("nan"), float("inf")


def inputs(B=2, T=37, G=1, H=2, K=4, V=3, L=7, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    return dict(
        q=r(B, T, G, K).to(dtype), k=(r(B, T, G, K) / math.sqrt(K)).to(dtype), v=r(B, T, H, V).to(dtype),
        g=(-F.softplus(r(B, T, H)) * 0.1).to(dtype), lam=(F.softplus(r(B, T, H, L)) + 0.1).to(dtype),
    )


def triton_inputs(T=40):
    # sizes the kernels take (K, V in 16..128, fp32); one 64-token chunk at T = 40
    return inputs(B=1, T=T, H=2, K=16, V=16, L=7, dtype=torch.float32)


def with_value(x, name, s, value):
    x = {n: t.clone() for n, t in x.items()}
    if name == "g":
        x["g"][:, s, 0] = value
    else:
        x[name][:, s] = value
    return x


# The torch paths: the chunked code at a small chunk (several chunks and tree heights), the
# public entry (default chunk of 64: one chunk here) and the O(T²) definition.
TORCH_PATHS = {
    "chunked-C4": lambda **x: chunked_log_linear_attn(**x, chunk_size=4),
    "torch": lambda **x: log_linear_attn(**x, backend="torch"),
    "naive": lambda **x: log_linear_attn(**x, backend="naive"),
}


# ------------------------------------------------------------------ check_finite

def bad_values(names):
    """(tensor, value) cases; g = -inf is left out: a reset, legitimate (tested below)."""
    return [pytest.param(n, v, id=f"{n}-{i}") for n in names for v, i in ((NAN, "nan"), (INF, "inf"), (-INF, "-inf"))
            if not (n == "g" and v == -INF)]


@pytest.mark.parametrize("name, value", bad_values(["q", "k", "v", "g", "lam"]))
def test_check_finite_refuses_non_finite(name, value):
    x = with_value(inputs(), name, 11, value)
    with pytest.raises(ValueError, match=rf"^{name} .*index \[0, 11"):
        log_linear_attn(**x, backend="torch", check_finite=True)


def test_check_finite_refuses_positive_g_and_negative_lam():
    with pytest.raises(ValueError, match=r"^g must be .*<= 0, got 0.5 at index \[0, 3, 0\]"):
        log_linear_attn(**with_value(inputs(), "g", 3, 0.5), check_finite=True)
    with pytest.raises(ValueError, match=r"^lam must be >= 0, got -1.0 at index \[0, 5"):
        log_linear_attn(**with_value(inputs(), "lam", 5, -1.0), check_finite=True)


def test_check_finite_names_v_scale_and_the_state():
    x = inputs()
    v_scale = torch.ones(x["v"].shape[:3], dtype=x["v"].dtype)
    v_scale[1, 2, 0] = NAN
    with pytest.raises(ValueError, match=r"^v_scale .*index \[1, 2, 0\]"):
        log_linear_attn(**x, v_scale=v_scale, check_finite=True)
    levels = torch.zeros(2, 2, 2, 4, 3, dtype=torch.float64)
    levels[0, 1, 1, 2, 0] = INF
    with pytest.raises(ValueError, match=r"^initial_state.levels .*index \[0, 1, 1, 2, 0\]"):
        log_linear_attn(**x, initial_state=LogLinearState(levels, 3), check_finite=True)


def test_without_check_finite_values_are_not_checked():
    x = with_value(with_value(inputs(), "v", 20, NAN), "g", 25, 0.5)
    o, _ = log_linear_attn(**x, backend="torch")  # no error: metadata checks only
    assert torch.isfinite(o[:, :20]).all() and not torch.isfinite(o[:, 20]).all()


def test_check_finite_accepts_clean_inputs_unchanged():
    x = inputs()
    o_ref, _ = log_linear_attn(**x, backend="torch")
    o, _ = log_linear_attn(**x, backend="torch", check_finite=True)
    assert torch.equal(o, o_ref)


# ------------------------------------------------------------------ causality, torch paths

@pytest.mark.parametrize("path", list(TORCH_PATHS))
@pytest.mark.parametrize("name, value", bad_values(["k", "v", "g", "lam"]))
@pytest.mark.parametrize("s", [5, 29])
def test_torch_paths_are_causal_with_non_finite_inputs(path, name, value, s):
    fn = TORCH_PATHS[path]
    x = inputs()
    o_ref, _ = fn(**x)
    o, _ = fn(**with_value(x, name, s, value))
    assert_close("earlier outputs", o_ref[:, :s], o[:, :s], 1e-12)
    assert torch.isfinite(o[:, :s]).all()
    assert not torch.isfinite(o[:, s]).all()  # the bad value does show where it belongs


@pytest.mark.parametrize("path", ["chunked-C4", "naive"])
def test_torch_paths_stateful_final_state_is_causal(path):
    # the state after the first s tokens is untouched by a NaN key at s
    x = inputs()
    s = 13
    bad = with_value(x, "k", s, NAN)
    fn = TORCH_PATHS[path]
    _, st_ref = fn(**{n: t[:, :s] for n, t in x.items()}, output_final_state=True)
    _, st = fn(**{n: t[:, :s] for n, t in bad.items()}, output_final_state=True)
    assert torch.equal(st.levels, st_ref.levels)
    o, _ = fn(**{n: t[:, s:] for n, t in bad.items()}, initial_state=st)
    assert not torch.isfinite(o[:, 0]).all()


# ------------------------------------------------------------------ resets (g = -inf)

@pytest.mark.parametrize("path", list(TORCH_PATHS))
@pytest.mark.parametrize("r", [13, 16])
def test_reset_equals_a_fresh_start(path, r):
    """From a reset on, outputs and the final state are those of a run that starts at r
    from an empty state (same absolute positions): nothing before r reaches them."""
    fn = TORCH_PATHS[path]
    x = inputs()
    x["g"][:, r] = -INF
    o, st = fn(**x, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(st.levels).all()
    tail = {n: t[:, r:].clone() for n, t in x.items()}
    tail["g"][:, 0] = 0.0  # the decay into r only ever multiplies what came before
    empty = LogLinearState(torch.zeros(2, 2, r.bit_length(), 4, 3, dtype=torch.float64), r)
    o_ref, st_ref = fn(**tail, initial_state=empty, output_final_state=True)
    assert_close("outputs from the reset on", o_ref, o[:, r:], 1e-12)
    assert_close("final state", st_ref.levels, st.levels, 1e-12)
    # outputs before the reset are as without it
    o_plain, _ = fn(**inputs())
    assert_close("outputs before the reset", o_plain[:, :r], o[:, :r], 1e-12)


@pytest.mark.parametrize("path", ["chunked-C4", "naive"])
def test_reset_gradients_are_finite(path):
    x = {n: t.requires_grad_() for n, t in inputs().items()}
    with torch.no_grad():
        x["g"][:, 9, 1] = -INF
    o, st = TORCH_PATHS[path](**x, output_final_state=True)
    (o.sum() + st.levels.sum()).backward()
    for name, t in x.items():
        assert torch.isfinite(t.grad).all(), name


def test_check_finite_accepts_a_reset_on_torch_paths():
    x = with_value(inputs(), "g", 7, -INF)
    for backend in ("torch", "naive", "auto"):  # auto is the torch code on the CPU
        o, _ = log_linear_attn(**x, backend=backend, check_finite=True)
        assert torch.isfinite(o).all()


# ------------------------------------------------------------------ Triton, forced on CPU

@pytest.mark.parametrize("name", ["g", "lam"])
def test_triton_is_causal_for_non_finite_g_and_lam(name):
    x = triton_inputs()
    o_ref, _ = log_linear_attn(**x, backend="triton")
    o, _ = log_linear_attn(**with_value(x, name, 29, NAN), backend="triton")
    assert torch.equal(o[:, :29], o_ref[:, :29])
    assert not torch.isfinite(o[:, 29]).all()


@pytest.mark.parametrize("name", ["k", "v"])
def test_triton_check_finite_refuses_non_finite_k_and_v(name):
    with pytest.raises(ValueError, match=rf"^{name} has a non-finite value \(nan\) at index \[0, 29"):
        log_linear_attn(**with_value(triton_inputs(), name, 29, NAN), backend="triton", check_finite=True)


@pytest.mark.parametrize("T", [40, 150])
@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("name", ["q", "k", "v", "g", "lam"])
def test_triton_causal_for_non_finite_inputs(name, bad, T):
    """A non-finite input at t = 29 (inside the first 64-token chunk) leaves every earlier
    output as it was, and the outputs the exact sum makes non-finite are non-finite."""
    clean = triton_inputs(T)
    o_clean, _ = log_linear_attn(**clean, backend="triton")
    o, _ = log_linear_attn(**with_value(clean, name, 29, bad), backend="triton")
    assert torch.equal(o[:, :29], o_clean[:, :29])
    ref, _ = log_linear_attn(**with_value(clean, name, 29, bad), backend="naive")
    assert torch.equal(torch.isfinite(o), torch.isfinite(ref))


def test_triton_check_finite_refuses_a_reset():
    with pytest.raises(ValueError, match=r"^g = -inf \(a reset\) at index \[0, 9, 0\].*Triton"):
        log_linear_attn(**with_value(triton_inputs(), "g", 9, -INF), backend="triton", check_finite=True)


def test_triton_check_finite_accepts_clean_inputs():
    x = triton_inputs()
    o, _ = log_linear_attn(**x, backend="triton", check_finite=True)
    o_ref, _ = log_linear_attn(**x, backend="naive")
    assert_close("o", o_ref, o, 1e-4)


# ------------------------------------------------------------------ CLI

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a sweep or a parameter table starts."""
    import mixerzoo.evals.synthetic.sweep as sweep
    import mixerzoo.models.build as build

    def refuse(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(sweep, "train_one", refuse)
    monkeypatch.setattr(build, "param_rows", refuse)


def test_synth_out_is_an_existing_file(tmp_path, capsys, no_work):
    path = tmp_path / "results.json"
    path.write_text("{}")
    assert main(["synth", "mqar", "--preset", "demo", "--device", "cpu", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixerzoo synth: error: --out") and "existing file" in err
    assert path.read_text() == "{}"


def test_synth_out_under_a_file(tmp_path, capsys, no_work):
    (tmp_path / "f").write_text("")
    assert main(["synth", "mqar", "--preset", "demo", "--device", "cpu", "--out", str(tmp_path / "f" / "x")]) == 2
    assert "mixerzoo synth: error: --out" in capsys.readouterr().err


def test_run_synthetic_checks_out_dir_before_training(tmp_path, no_work):
    from mixerzoo.evals.synthetic import preset, run_synthetic

    path = tmp_path / "taken"
    path.write_text("")
    with pytest.raises(ValueError, match="out_dir .*existing file"):
        run_synthetic(preset("demo", mixers=("softmax",), out_dir=str(path), progress=False))


def test_params_json_is_a_directory(tmp_path, capsys, no_work):
    assert main(["params", "--size", "tiny", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixerzoo params: error: --json") and "folder" in err


def test_params_json_folder_missing(tmp_path, capsys, no_work):
    assert main(["params", "--size", "tiny", "--json", str(tmp_path / "no" / "p.json")]) == 2
    assert "mixerzoo params: error: --json" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["synth", "mqar", "--seeds", "0"], "--seeds"),
    (["synth", "mqar", "--seeds", "-2"], "--seeds"),
    (["synth", "mqar", "--steps", "0"], "--steps"),
    (["synth", "mqar", "--steps", "-5"], "--steps"),
    (["synth", "mqar", "--time-limit", "-1"], "--time-limit"),
    (["synth", "mqar", "--time-limit", "nan"], "--time-limit"),
    (["params", "--vocab-size", "0"], "--vocab-size"),
], ids=["seeds0", "seeds-neg", "steps0", "steps-neg", "time-limit-neg", "time-limit-nan", "vocab-size0"])
def test_bad_numeric_flags_exit_2_naming_the_flag(argv, flag, capsys, no_work):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"mixerzoo {argv[0]}: error: argument {flag}:" in err
