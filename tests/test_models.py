"""Models: matched sizes, the transformers face (save/load, Auto classes), generation, errors."""

from __future__ import annotations

import json

import pytest
import torch

import mixerzoo
from mixerzoo.models.build import param_rows, param_target
from mixerzoo.models.io import CheckpointError
from mixerzoo.models.sizes import SIZES

BUILTINS = mixerzoo.list_mixers()  # every registered mixer, whatever their number


def tiny(name, **kw):
    torch.manual_seed(0)
    kw.setdefault("vocab_size", 97)
    return mixerzoo.build_model(name, size="tiny", **kw).eval()


@pytest.mark.parametrize("size", list(SIZES))
def test_every_mixer_within_one_percent(size):
    rows = param_rows(size, BUILTINS)
    assert [r["mixer"] for r in rows] == BUILTINS
    for r in rows:
        assert abs(r["deviation"]) <= 0.01, r
    softmax = rows[0]
    assert softmax["params"] == param_target(size)


def test_param_count_matches_real_model():
    for name in BUILTINS:
        model = tiny(name)
        counted = model.num_parameters() - model.embed.weight.numel()
        row = param_rows("tiny", [name], vocab_size=97)[0]
        assert counted == row["params"], name


def test_adaptive_pays_with_narrower_mlp():
    fixed, adaptive = param_rows("125m", ["loglinear_fixed", "loglinear_adaptive"])
    assert adaptive["mlp_hidden"] < fixed["mlp_hidden"]


@pytest.mark.parametrize("name", BUILTINS)
def test_forward_loss_and_backends(name):
    model = tiny(name)
    x = torch.randint(0, 97, (2, 19))
    out = model(x, labels=x)
    assert out.logits.shape == (2, 19, 97)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(b in ("torch", "sdpa") for b in model.backends().values()), model.backends()


@pytest.mark.parametrize("name", BUILTINS)
def test_save_load_roundtrip_bit_exact(name, tmp_path):
    model = tiny(name)
    x = torch.randint(0, 97, (2, 11))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = mixerzoo.load_model(tmp_path).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny("loglinear_adaptive")
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "mixerzoo" and cfg.mixer == "loglinear_adaptive"
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "MixerZooForCausalLM"


@pytest.mark.parametrize("name", BUILTINS)
def test_greedy_generate_equals_full_forward(name):
    model = tiny(name)
    prompt = torch.randint(0, 97, (2, 7))
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], prompt)
    # the same tokens by re-running the whole sequence each time (no recurrent state)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampled_generate_seeded():
    model = tiny("loglinear_adaptive")
    prompt = torch.randint(0, 97, (3, 5))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    c = model.generate(prompt, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 13) and int(a.max()) < 97


def test_generate_stops_at_eos():
    model = tiny("softmax")
    prompt = torch.randint(0, 97, (1, 4))
    first = model.generate(prompt, max_new_tokens=1)[0, -1].item()
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (1, 5)


def test_hybrid_layers():
    model = mixerzoo.build_model(["softmax", "loglinear_adaptive"], size="tiny", vocab_size=50, n_layers=4)
    assert [type(b.mixer).__name__ for b in model.blocks] == ["SoftmaxAttention", "LogLinearMamba2"] * 2
    assert model.config.mixer == "hybrid(softmax,loglinear_adaptive)"
    x = torch.randint(0, 50, (1, 9))
    assert model(x).logits.shape == (1, 9, 50)
    with pytest.raises(ValueError, match="divisible"):
        mixerzoo.build_model(["softmax", "linear"], size="tiny", n_layers=3)


def test_mixer_options_reach_the_mixer():
    model = mixerzoo.build_model("loglinear_adaptive", size="tiny", vocab_size=50, mixer_options={"max_levels": 9})
    assert model.blocks[0].mixer.max_levels == 9


@pytest.mark.parametrize("bad", ["notjson", "noweights", "truncated", "missing-key"])
def test_corrupt_checkpoint_errors(tmp_path, bad):
    model = tiny("softmax")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if bad == "notjson":
        (tmp_path / "config.json").write_text("{ not json")
    elif bad == "noweights":
        weights.unlink()
    elif bad == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif bad == "missing-key":
        from safetensors.torch import load_file, save_file

        sd = load_file(weights)
        sd.pop(next(k for k in sd if "mlp" in k))
        save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        mixerzoo.load_model(tmp_path)


def test_config_json_is_portable(tmp_path):
    model = tiny("loglinear_adaptive")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["layers"][0]["class"] == "mixerzoo.mixers.loglinear:LogLinearMamba2"
    assert cfg["layers"][0]["options"]["lambda_mode"] == "mlp"


def test_bad_input_ids():
    model = tiny("softmax")
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="padded"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.parametrize("order", ["mixerzoo first", "transformers first"])
def test_bare_import_registers_the_auto_classes_cheaply(tmp_path, order):
    import subprocess
    import sys

    mixerzoo.build_model("softmax", size="tiny").save_pretrained(tmp_path / "ckpt")
    first, second = "import mixerzoo", "from transformers import AutoConfig, AutoModelForCausalLM"
    if order == "transformers first":
        first, second = second, first
    code = (f"import sys\n{first}\n"
            "light = 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            f"{second}\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
            f"print(type(m).__name__, AutoConfig.from_pretrained({str(tmp_path / 'ckpt')!r}).model_type, light)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, model_type, light = out.stdout.split()[-3:]
    assert (name, model_type) == ("MixerZooForCausalLM", "mixerzoo")
    assert light == ("True" if order == "mixerzoo first" else "False")


def test_load_model_takes_a_run_folder(tmp_path):
    model = mixerzoo.build_model("mamba2", size="tiny")
    model.save_pretrained(tmp_path / "run" / "checkpoints" / "step_00000002")
    (tmp_path / "run" / "latest").write_text("step_00000002\n")
    loaded = mixerzoo.load_model(tmp_path / "run")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    (tmp_path / "run" / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="step_00000009"):
        mixerzoo.load_model(tmp_path / "run")


def test_the_auto_registration_survives_a_probe_and_never_breaks_transformers(tmp_path):
    import subprocess
    import sys

    mixerzoo.build_model("softmax", size="tiny").save_pretrained(tmp_path / "ckpt")
    probe = ("import importlib.util, mixerzoo\n"
             "importlib.util.find_spec('transformers.models.auto.modeling_auto')\n"  # a look, no import
             "from transformers import AutoModelForCausalLM\n"
             f"print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})).__name__)\n")
    broken = ("import sys, warnings, mixerzoo\n"
              "sys.modules['mixerzoo.models.hf'] = None\n"  # mixerzoo's LM cannot be imported
              "del sys.modules['mixerzoo.models.hf']\n"
              "sys.modules['mixerzoo.ops.fused'] = None\n"
              "with warnings.catch_warnings(record=True) as w:\n"
              "    warnings.simplefilter('always')\n"
              "    from transformers import AutoModelForCausalLM, LlamaConfig\n"
              "print(AutoModelForCausalLM.__name__, any('could not register' in str(x.message) for x in w))\n")
    for code, want in ((probe, "MixerZooForCausalLM"), (broken, "AutoModelForCausalLM True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().endswith(want), out.stdout + out.stderr[-1000:]
