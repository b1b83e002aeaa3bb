"""The LM trainer from its contract: checkpoints that reload in transformers, exact resume after a
real kill, DDP / FSDP / accumulation on the same loss curve, atomic saves, errors that name
what is wrong, YAML configs, the learning-rate schedule and the weight-decay groups.

Everything runs on the CPU with ``tiny`` models on one small generated corpus, tokenised once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixerzoo import list_mixers
from mixerzoo.cli import main
from mixerzoo.models.io import CheckpointError
from mixerzoo.data import DataError
from mixerzoo.data.tokenizers import TokenizerError
from mixerzoo.train import ConfigError, TrainConfig, Trainer, train
from mixerzoo.train import checkpoint as ckpt_mod
from mixerzoo.train.trainer import lr_at, no_decay_names

# The shared small run: 8 steps, checkpoints at 4 and 8, validation at 4 and 8.
BASE = dict(seq_len=64, batch_size=8, steps=8, log_every=1, val_every=4, save_every=4,
            warmup_steps=2, lr=3e-3, val_fraction=0.05, val_batches=2, progress=False)


def _flags(values: dict) -> list[str]:
    """CLI flags for TrainConfig values (booleans as --x / --no-x)."""
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _val_losses(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["val_loss"], r["val_bpb"]) for r in _records(run) if "val_loss" in r}


def _latest(run: Path) -> str:
    return (Path(run) / "latest").read_text().strip()


def _step_of(name: str) -> int:
    return int(name.split("_")[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _assert_close_curves(got: dict, ref: dict, what: str, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(ref), f"{what}: steps {sorted(got)} != {sorted(ref)}"
    for step in ref:
        a, b = got[step], ref[step]
        rel = abs(a - b) / abs(b)
        assert rel < tol, f"{what}: step {step}: loss {a} vs {b} (relative difference {rel:.2e})"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One generated corpus and its token cache, shared by every test here."""
    from mixerzoo.data import tokenize_corpus
    from mixerzoo.data.tokenizers import load_tokenizer
    from mixerzoo.data.toy_text import write_corpus

    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=300)
    cache = root / "cache"
    tokenize_corpus(str(corpus), load_tokenizer(None), cache, progress=False)
    return {"data": str(corpus), "data_cache": str(cache)}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted single-process run of BASE."""
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(TrainConfig(out=str(out), **data, **BASE))
    assert summary["step"] == BASE["steps"]
    return out


def _torchrun(*train_args: str) -> str:
    """``mixerzoo train`` in two gloo processes under torchrun; its console output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "mixerzoo.cli", "train", *train_args]
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    """BASE run by two gloo processes under torchrun: (run folder, its console output)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, _torchrun(*_flags({**data, **BASE}), "--out", str(out))


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """BASE run by two gloo processes with FSDP2: its run folder."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    _torchrun(*_flags({**data, **BASE}), "--fsdp", "--out", str(out))
    return out


# --- 1. every mixer: train, save, reload through transformers --------------------------------

@pytest.mark.parametrize("mixer", list_mixers())
def test_every_mixer_trains_and_reloads_through_transformers(mixer, data, tmp_path):
    import transformers

    import mixerzoo
    import mixerzoo.models.hf  # noqa: F401  (registers the model with the Auto classes)
    from mixerzoo import build_model
    from mixerzoo.data.tokenizers import load_tokenizer

    cfg = TrainConfig(mixer=mixer, out=str(tmp_path / "run"), seq_len=32, batch_size=4, steps=3,
                      warmup_steps=1, lr=1e-2, log_every=1, val_every=3, save_every=3,
                      val_fraction=0.05, val_batches=1, progress=False, **data)
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    ckpt = Path(summary["checkpoint"])
    assert ckpt == tmp_path / "run" / "checkpoints" / "step_00000003"
    assert _latest(tmp_path / "run") == ckpt.name
    assert sorted(_train_losses(tmp_path / "run")) == [1, 2, 3]
    trained = trainer.raw.eval()

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ours = mixerzoo.load_model(ckpt).eval()
    assert type(hf_model).__name__ == "MixerZooForCausalLM"
    assert [layer["mixer"] for layer in hf_model.config.layers] == [mixer] * len(hf_model.config.layers)

    x = trainer.val_data.batch(0, 2)[:, :29]  # real text, a length that is not the training one
    with torch.no_grad():
        ref = trained(input_ids=x).logits
        got_hf = hf_model(input_ids=x).logits
        got_ours = ours(input_ids=x).logits
    assert torch.isfinite(ref).all()
    assert torch.equal(got_hf, ref), f"{mixer}: AutoModelForCausalLM logits differ from the trained model's"
    assert torch.equal(got_ours, ref), f"{mixer}: load_model logits differ from the trained model's"

    # The checkpoint holds the trained weights, not the initial ones.
    torch.manual_seed(cfg.seed)
    init = build_model(mixer, "tiny", vocab_size=len(trainer.tokenizer))
    saved = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(saved[n], p) for n, p in init.state_dict().items() if n in saved)
    for n, p in trained.state_dict().items():
        if n in saved:
            assert torch.equal(saved[n], p), f"{mixer}: saved {n} differs from the trained parameter"

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    byte = load_tokenizer(None)
    text = "The red fox lives in the forest. Ünïcode €"
    assert len(tok) == len(byte) == 257
    assert tok.eos_token_id == byte.eos_token_id == 256
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# --- 2. a real kill, then --resume -----------------------------------------------------------

def test_sigkill_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    values = {**data, "seq_len": 64, "batch_size": 8, "steps": 60, "log_every": 1, "val_every": 10,
              "save_every": 5, "warmup_steps": 5, "lr": 3e-3, "val_fraction": 0.05, "val_batches": 2,
              "progress": False}
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mixerzoo.cli", "train", *_flags(values), "--out", str(run)],
                            env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def latest_step() -> int:
        try:
            return _step_of(_latest(run))
        except (OSError, IndexError, ValueError):
            return 0

    def logged_max() -> int:
        try:
            return max((json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                        if line.strip()), default=0)
        except (OSError, ValueError):  # a line caught half-written
            return 0

    deadline = time.monotonic() + 120
    try:
        # A checkpoint past the first, and steps logged past it, before the kill.
        while proc.poll() is None and time.monotonic() < deadline:
            k = latest_step()
            if k >= 2 * values["save_every"] and logged_max() >= k + 2:
                break
            time.sleep(0.003)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert still_running, f"the run ended (rc {proc.returncode}) before it could be killed:\n{err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, f"rc {proc.returncode}: not killed by SIGKILL"
    ckpt_step = latest_step()
    logged_before = {r["step"] for r in _records(run) if "loss" in r}
    assert 2 * values["save_every"] <= ckpt_step < values["steps"], f"killed at checkpoint {ckpt_step}"
    assert max(logged_before) > ckpt_step, "the killed segment should have logged steps past its checkpoint"

    ref = tmp_path / "ref"
    assert main(["train", *_flags(values), "--out", str(ref)]) == 0
    assert main(["train", "--resume", str(run)]) == 0

    recs = _records(run)
    train_steps = [r["step"] for r in recs if "loss" in r]
    val_steps = [r["step"] for r in recs if "val_loss" in r]
    assert train_steps == list(range(1, values["steps"] + 1)), "one train record per step, in order"
    assert val_steps == list(range(10, values["steps"] + 1, 10)), "one validation record per validation"
    assert _train_losses(run) == _train_losses(ref)  # bit for bit
    assert _val_losses(run) == _val_losses(ref)
    assert _latest(run) == _latest(ref) == "step_00000060"
    a = load_file(str(run / "checkpoints" / "step_00000060" / "model.safetensors"))
    b = load_file(str(ref / "checkpoints" / "step_00000060" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 3. DDP, gradient accumulation and FSDP give the single-process curve --------------------

def test_two_process_ddp_matches_single_process(ddp_run, reference):
    run, _ = ddp_run
    _assert_close_curves(_train_losses(run), _train_losses(reference), "DDP train loss")
    got, ref = _val_losses(run), _val_losses(reference)
    _assert_close_curves({k: v[0] for k, v in got.items()}, {k: v[0] for k, v in ref.items()}, "DDP val loss")
    state = json.loads((run / "checkpoints" / _latest(run) / "trainer" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == BASE["steps"]
    assert (run / "checkpoints" / _latest(run) / "trainer" / "rng_rank1.safetensors").is_file()


def test_ddp_prints_each_validation_once(ddp_run):
    _, stdout = ddp_run
    lines = [line for line in stdout.splitlines() if line.startswith(f"step {BASE['steps']}: val loss")]
    assert len(lines) == 1, f"the validation line should come from rank 0 only, got {lines}"


def test_gradient_accumulation_matches(data, reference, tmp_path):
    out = tmp_path / "accum"
    train(TrainConfig(out=str(out), micro_batch_size=2, **data, **BASE))  # 4 micro-steps per step
    _assert_close_curves(_train_losses(out), _train_losses(reference), "accumulation train loss")
    _assert_close_curves({k: v[0] for k, v in _val_losses(out).items()},
                         {k: v[0] for k, v in _val_losses(reference).items()}, "accumulation val loss")


def test_fsdp_in_one_process_matches(data, reference, tmp_path, monkeypatch):
    # a process group of one (gloo); keep its environment out of the other tests
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "fsdp"
    train(TrainConfig(out=str(out), fsdp=True, **data, **BASE))
    assert not torch.distributed.is_initialized()
    _assert_close_curves(_train_losses(out), _train_losses(reference), "FSDP train loss")
    # its checkpoint is a full (unsharded) model
    import mixerzoo

    model = mixerzoo.load_model(out / "checkpoints" / _latest(out))
    ref_sd = load_file(str(reference / "checkpoints" / _latest(reference) / "model.safetensors"))
    for n, p in model.state_dict().items():
        if n in ref_sd:
            assert p.shape == ref_sd[n].shape


def test_two_process_fsdp_matches_single_process(fsdp_run, reference):
    _assert_close_curves(_train_losses(fsdp_run), _train_losses(reference), "FSDP train loss")
    got, ref = _val_losses(fsdp_run), _val_losses(reference)
    _assert_close_curves({k: v[0] for k, v in got.items()}, {k: v[0] for k, v in ref.items()}, "FSDP val loss")
    state = json.loads((fsdp_run / "checkpoints" / _latest(fsdp_run) / "trainer" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == BASE["steps"] and state["config"]["fsdp"]


# --- 4. a 2-process checkpoint resumes in one process, and the other way round ----------------

def _cut_to_step_4(src: Path, run: Path) -> Path:
    """A copy of a finished BASE run as if it had been killed just after its step-4 checkpoint."""
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "latest").write_text("step_00000004\n")
    return run


def _assert_resumed_like_reference(run: Path, reference: Path, world_size: int, what: str,
                                   fsdp: bool = False) -> None:
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer" / "state.json").read_text())
    assert state["world_size"] == world_size and state["step"] == 8
    assert bool(state["config"].get("fsdp")) == fsdp
    got, ref = _train_losses(run), _train_losses(reference)
    assert sorted(got) == list(range(1, 9))
    _assert_close_curves({s: got[s] for s in range(5, 9)}, {s: ref[s] for s in range(5, 9)}, what)
    assert abs(_val_losses(run)[8][0] - _val_losses(reference)[8][0]) / _val_losses(reference)[8][0] < 1e-5


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_run, reference, tmp_path):
    run = _cut_to_step_4(fsdp_run, tmp_path / "from_fsdp")
    assert main(["train", "--resume", str(run), "--no-fsdp"]) == 0
    _assert_resumed_like_reference(run, reference, 1, "FSDP run resumed in one process")


def test_one_process_checkpoint_resumes_in_two_fsdp_processes(reference, tmp_path):
    run = _cut_to_step_4(reference, tmp_path / "to_fsdp")
    _torchrun("--resume", str(run), "--fsdp")
    _assert_resumed_like_reference(run, reference, 2, "one-process run resumed with FSDP on two", fsdp=True)


def test_ddp_checkpoint_resumes_in_one_process(ddp_run, reference, tmp_path):
    run = _cut_to_step_4(ddp_run[0], tmp_path / "from_ddp")
    assert main(["train", "--resume", str(run)]) == 0
    _assert_resumed_like_reference(run, reference, 1, "resumed DDP loss")


# --- 5. a save that fails leaves the previous checkpoint and 'latest' intact -----------------

def test_failed_save_keeps_previous_checkpoint(data, reference, tmp_path, monkeypatch):
    import mixerzoo

    real_save = ckpt_mod.save_file
    calls = {"optimizer": 0}

    class DiskFull(OSError):
        pass

    def flaky_save(tensors, filename, *args, **kwargs):
        if Path(filename).name == "optimizer.safetensors":
            calls["optimizer"] += 1
            if calls["optimizer"] == 2:
                real_save(tensors, filename, *args, **kwargs)  # a partial file is on disk
                raise DiskFull("no space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky_save)
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), **data, **BASE)
    with pytest.raises(DiskFull):
        train(cfg)
    assert calls["optimizer"] == 2
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)

    assert _latest(out) == "step_00000004"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000004"], f"checkpoint folder holds {ckpts}"
    good = out / "checkpoints" / "step_00000004"
    assert ckpt_mod.read_state(good)["step"] == 4
    mixerzoo.load_model(good)
    ref = reference / "checkpoints" / "step_00000004"
    for name in ("model.safetensors", "trainer/optimizer.safetensors"):
        a, b = load_file(str(good / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # and the run goes on from it as if nothing had happened
    train(cfg, resume=True)
    assert _train_losses(out) == _train_losses(reference)
    assert _val_losses(out) == _val_losses(reference)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# --- 6. bad input: the error names the culprit -----------------------------------------------

def _cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert err.startswith("mixerzoo train: error: "), err
    return err


def _small(data, **kw) -> list[str]:
    return _flags({"data_cache": data["data_cache"], "seq_len": 32, "batch_size": 4, "steps": 2,
                   "save_every": 2, "val_every": 2, "val_fraction": 0.05, "progress": False, **kw})


def test_missing_data_file(data, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    err = _cli_error(["--data", str(missing), "--out", str(tmp_path / "r"), *_small(data)], capsys)
    assert str(missing) in err and "does not exist" in err
    with pytest.raises(DataError, match="nowhere"):
        train(TrainConfig(data=str(missing), out=str(tmp_path / "r2"), data_cache=data["data_cache"]))
    with pytest.raises(ConfigError, match="data"):
        train(TrainConfig(out=str(tmp_path / "r3")))


def test_empty_data_file(data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _cli_error(["--data", str(empty), "--out", str(tmp_path / "r"), *_small(data)], capsys)
    assert str(empty) in err
    with pytest.raises(DataError, match="empty.jsonl"):
        train(TrainConfig(data=str(empty), out=str(tmp_path / "r2"), data_cache=data["data_cache"]))


def test_jsonl_without_the_text_field(data, tmp_path, capsys):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"body": "a document"}) + "\n")
    err = _cli_error(["--data", str(path), "--out", str(tmp_path / "r"), *_small(data)], capsys)
    assert str(path) in err and "'text'" in err and "line 1" in err
    err = _cli_error(["--data", data["data"], "--text-field", "content", "--out", str(tmp_path / "r"),
                      *_small(data)], capsys)
    assert "'content'" in err and "corpus.jsonl" in err


def test_unloadable_tokenizer(data, tmp_path, capsys):
    err = _cli_error(["--data", data["data"], "--tokenizer", "/nonexistent", "--out", str(tmp_path / "r"),
                      *_small(data)], capsys)
    assert "'/nonexistent'" in err
    with pytest.raises(TokenizerError, match="/nonexistent"):
        train(TrainConfig(data=data["data"], tokenizer="/nonexistent", out=str(tmp_path / "r2"),
                          data_cache=data["data_cache"]))
    assert not (tmp_path / "r" / "latest").exists()


def test_vocab_smaller_than_tokenizer(data, tmp_path, capsys):
    err = _cli_error(["--data", data["data"], "--vocab-size", "100", "--out", str(tmp_path / "r"),
                      *_small(data)], capsys)
    assert "vocab_size=100" in err and "257" in err


def test_unknown_yaml_key_lists_the_known_ones(data, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seq_lenn: 64\nsteps: 2\n")
    err = _cli_error(["--config", str(cfg), "--data", data["data"], "--out", str(tmp_path / "r")], capsys)
    assert str(cfg) in err and "'seq_lenn'" in err and "did you mean 'seq_len'" in err
    for known in TrainConfig.field_names():
        assert known in err
    with pytest.raises(ConfigError, match="seq_lenn"):
        TrainConfig.from_dict({"seq_lenn": 3})


@pytest.mark.parametrize("argv, name", [
    (["--seq-len", "1"], "seq_len"),
    (["--steps", "0"], "steps"),
    (["--lr", "0"], "lr"),
    (["--min-lr-ratio", "1.5"], "min_lr_ratio"),
    (["--val-fraction", "1"], "val_fraction"),
    (["--precision", "fp8"], "precision"),
])
def test_out_of_range_flag(argv, name, data, tmp_path, capsys):
    err = _cli_error(["--data", data["data"], "--out", str(tmp_path / "r"), *argv], capsys)
    assert f"{name}=" in err
    assert not (tmp_path / "r").exists()


def test_unparsable_flag_value(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", data["data"], "--out", str(tmp_path / "r"), "--seq-len", "abc"])
    assert e.value.code == 2
    assert "--seq-len" in capsys.readouterr().err


@pytest.mark.parametrize("text, name", [
    ("lr: -1\n", "lr"),
    ("seq_len: [1, 2]\n", "seq_len"),
    ("steps: 2.5\n", "steps"),
    ("weight_decay: high\n", "weight_decay"),
    ("min_lr_ratio: '0.1'\n", "min_lr_ratio"),
])
def test_wrong_yaml_value(text, name, data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    err = _cli_error(["--config", str(cfg), "--data", data["data"], "--out", str(tmp_path / "r")], capsys)
    assert name in err, f"the message does not name {name}: {err}"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(cfg)
    assert name in str(e.value)


def test_yaml_number_in_scientific_notation(tmp_path):
    # `lr: 3e-4` is how learning rates are written; the YAML loader reads it as the string '3e-4'
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 3e-4\nweight_decay: 1e-2\n")
    loaded = TrainConfig.from_yaml(cfg)
    assert loaded.lr == 3e-4 and loaded.weight_decay == 1e-2


def test_resume_without_a_checkpoint(data, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    err = _cli_error(["--resume", str(empty)], capsys)
    assert str(empty) in err and "no checkpoint" in err
    with pytest.raises(CheckpointError, match="empty_run"):
        train(TrainConfig(out=str(empty), **data, **BASE), resume=True)


def test_resume_with_latest_naming_a_missing_checkpoint(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / _latest(run))
    err = _cli_error(["--resume", str(run)], capsys)
    assert "latest" in err and "step_00000008" in err


@pytest.mark.parametrize("argv, name", [
    (["--mixer", "softmax"], "mixer"),
    (["--seq-len", "32"], "seq_len"),
    (["--size", "125m"], "size"),
    (["--lr", "0.1"], "lr"),
])
def test_resume_with_changed_settings_is_refused(argv, name, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _snapshot(run)
    err = _cli_error(["--resume", str(run), *argv], capsys)
    assert f"{name}:" in err and str(run) in err
    assert _snapshot(run) == before, "a refused resume must leave the run untouched"


def test_resume_with_changed_data_is_refused(data, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(data["data"], corpus)
    run = tmp_path / "run"
    args = ["--data", str(corpus), *_small(data)]
    assert main(["train", *args, "--out", str(run)]) == 0
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "A new document that was not there before."}) + "\n")
    before = _snapshot(run)
    err = _cli_error(["--resume", str(run)], capsys)
    assert "data" in err and str(run) in err
    assert _snapshot(run) == before


def test_second_run_into_an_existing_out_is_refused(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _snapshot(run)
    err = _cli_error(["--data", data["data"], "--out", str(run), *_small(data)], capsys)
    assert str(run) in err and "--resume" in err
    assert _snapshot(run) == before
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(out=str(run), **data, **BASE))
    assert _snapshot(run) == before


def test_batch_not_divisible_into_micro_batches(data, tmp_path, capsys):
    err = _cli_error(["--data", data["data"], "--out", str(tmp_path / "r"),
                      *_small(data, batch_size=8, micro_batch_size=3)], capsys)
    assert "micro_batch_size=3" in err and "8" in err


def _broken_copy(reference, tmp_path, name) -> Path:
    ckpt = tmp_path / name
    shutil.copytree(reference / "checkpoints" / _latest(reference), ckpt)
    return ckpt


def test_load_model_refuses_missing_weights(reference, tmp_path):
    import mixerzoo

    ckpt = _broken_copy(reference, tmp_path, "missing")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        mixerzoo.load_model(ckpt)
    assert str(ckpt) in str(e.value) and "safetensors" in str(e.value)


def test_load_model_refuses_truncated_weights(reference, tmp_path):
    import mixerzoo

    ckpt = _broken_copy(reference, tmp_path, "truncated")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        mixerzoo.load_model(ckpt)
    assert "model.safetensors" in str(e.value), f"the message does not name the file: {e.value}"


def test_load_model_refuses_another_architecture(reference, tmp_path):
    import mixerzoo

    ckpt = _broken_copy(reference, tmp_path, "other_arch")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        mixerzoo.load_model(ckpt)
    assert "config.json" in str(e.value) or "llama" in str(e.value)


def test_load_model_refuses_corrupt_config(reference, tmp_path):
    import mixerzoo

    ckpt = _broken_copy(reference, tmp_path, "bad_config")
    (ckpt / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json"):
        mixerzoo.load_model(ckpt)


# --- 7. YAML configs ------------------------------------------------------------------------

def test_yaml_config_equals_flags_and_flags_override(data, tmp_path):
    import yaml

    values = {"seq_len": 32, "batch_size": 4, "steps": 4, "log_every": 1, "val_every": 2, "save_every": 4,
              "warmup_steps": 1, "lr": 0.003, "betas": [0.9, 0.99], "val_fraction": 0.05, "val_batches": 1,
              "progress": False, "mixer": "mamba2", **data}
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(values))
    by_yaml, by_flags, overridden = tmp_path / "yaml", tmp_path / "flags", tmp_path / "override"
    assert main(["train", "--config", str(cfg_file), "--out", str(by_yaml)]) == 0
    flag_values = {**values, "betas": "0.9,0.99"}
    assert main(["train", *_flags(flag_values), "--out", str(by_flags)]) == 0

    def saved(run):
        return {k: v for k, v in json.loads((run / "train_config.json").read_text()).items() if k != "out"}

    assert saved(by_yaml) == saved(by_flags)
    assert saved(by_yaml)["mixer"] == "mamba2" and saved(by_yaml)["betas"] == [0.9, 0.99]
    assert _train_losses(by_yaml) == _train_losses(by_flags) and len(_train_losses(by_yaml)) == 4
    assert _val_losses(by_yaml) == _val_losses(by_flags)

    # a YAML with other values, corrected on the command line
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**values, "steps": 50, "lr": 0.5, "mixer": "softmax"}))
    assert main(["train", "--config", str(other), "--steps", "4", "--lr", "0.003", "--mixer", "mamba2",
                 "--out", str(overridden)]) == 0
    assert saved(overridden) == saved(by_flags)
    assert _train_losses(overridden) == _train_losses(by_flags)


# --- 8. learning-rate schedule and weight-decay groups ---------------------------------------

def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.0
    for s in range(0, 11):
        assert lr_at(s, cfg) == pytest.approx(s / 10, abs=1e-12), f"warmup step {s}"
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)  # stays at the floor
    after = [lr_at(s, cfg) for s in range(10, 200)]
    assert all(a >= b for a, b in zip(after, after[1:])), "not monotone after warmup"
    assert min(after) == pytest.approx(0.1) and max(after) == pytest.approx(1.0)
    # no warmup: full lr at once, the floor at the end; min_lr_ratio 0 decays to zero
    cfg0 = TrainConfig(lr=2.0, warmup_steps=0, steps=50, min_lr_ratio=0.0)
    assert lr_at(1, cfg0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 50)))
    assert lr_at(50, cfg0) == pytest.approx(0.0, abs=1e-12)


def test_trainer_applies_the_schedule(reference):
    cfg = TrainConfig.from_dict(json.loads((reference / "train_config.json").read_text()))
    for r in _records(reference):
        if "loss" in r:
            assert r["lr"] == pytest.approx(lr_at(r["step"], cfg), rel=1e-12)
    state = json.loads((reference / "checkpoints" / _latest(reference) / "trainer" / "state.json").read_text())
    assert all(g["lr"] == pytest.approx(lr_at(BASE["steps"], cfg)) for g in state["param_groups"])


NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "lambda_theta", "lambda_L")


@pytest.mark.parametrize("mixer", list_mixers())
def test_weight_decay_groups(mixer, data, tmp_path):
    cfg = TrainConfig(mixer=mixer, out=str(tmp_path / "run"), weight_decay=0.05, seq_len=32, steps=1,
                      progress=False, **data)
    trainer = Trainer(cfg)
    try:
        decay_of = {}
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                assert id(p) not in decay_of, "a parameter is in two groups"
                decay_of[id(p)] = group["weight_decay"]
        named = list(trainer.raw.named_parameters())
        assert len(decay_of) == len(named), "every parameter is optimised exactly once"
        for n, p in named:
            leaf = n.rsplit(".", 1)[-1]
            wd = decay_of[id(p)]
            vector = p.dim() < 2
            if vector or leaf in NO_DECAY_NAMES or n.endswith(".bias") or "norm" in n \
                    or getattr(p, "_no_weight_decay", False):
                assert wd == 0.0, f"{mixer}: {n} {tuple(p.shape)} gets weight decay {wd}"
            else:
                assert wd == 0.05, f"{mixer}: matrix {n} {tuple(p.shape)} gets weight decay {wd}"
        names = {n for n, _ in named}
        assert "embed.weight" in names and decay_of[id(trainer.raw.embed.weight)] == 0.05
        assert any(decay_of[id(p)] == 0.05 for n, p in named if "proj" in n and p.dim() == 2)
        if mixer.startswith("loglinear") or mixer == "mamba2":
            assert {n.rsplit(".", 1)[-1] for n in names} >= {"A_log", "D", "dt_bias"}
    finally:
        trainer.close()


def test_no_decay_names_honours_the_marker():
    model = torch.nn.Module()
    model.table = torch.nn.Parameter(torch.zeros(4, 3))  # a 2-D per-head table
    model.table._no_weight_decay = True
    model.weight = torch.nn.Parameter(torch.zeros(4, 3))
    model.scale = torch.nn.Parameter(torch.zeros(4))
    assert no_decay_names(model) == {"table", "scale"}


def test_out_of_memory_says_what_to_change_and_keeps_the_checkpoint(data, tmp_path, monkeypatch):
    from mixerzoo.train import TrainingError

    out = tmp_path / "run"
    real_step = Trainer.train_step

    def step(self, n):
        if n == 6:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, n)

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(TrainingError, match="micro-batch-size"):
        train(TrainConfig(out=str(out), **data, **BASE))
    assert _latest(out) == "step_00000004"
    assert (out / "checkpoints" / "step_00000004" / "model.safetensors").is_file()


def test_tensorboard_logging(data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), tensorboard=True, **data, **{**BASE, "steps": 2, "save_every": 2}))
    assert any((out / "tensorboard").iterdir())


def test_activation_checkpointing_gives_identical_losses(data, reference, tmp_path):
    out = tmp_path / "ckpt_act"
    train(TrainConfig(out=str(out), checkpoint_activations=True, **data, **BASE))
    assert _train_losses(out) == _train_losses(reference)
    assert _val_losses(out) == _val_losses(reference)


def test_bf16_true_precision_trains_in_bf16(data, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "bf16"), precision="bf16-true", **data, **{**BASE, "steps": 4})
    trainer = Trainer(cfg)
    assert all(p.dtype == torch.bfloat16 for p in trainer.raw.parameters())
    summary = trainer.train()
    losses = _train_losses(tmp_path / "bf16")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(summary["val"]["val_loss"])


def test_precision_is_checked():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="bf8")


# --- 5. seeds share one validation set ------------------------------------------------------

def test_seeds_share_the_validation_documents_and_old_runs_keep_theirs(data, tmp_path):
    from mixerzoo.train.cli_args import config_from_args

    small = {**data, **BASE, "steps": 2, "save_every": 2, "val_every": 2, "val_fraction": 0.1}
    docs = {}
    for seed in (0, 1):
        t = Trainer(TrainConfig(out=str(tmp_path / f"s{seed}"), seed=seed, **small))
        docs[seed] = (list(t.val_data.docs), t.train_data.batch(0, 4))
    assert docs[0][0] == docs[1][0], "another seed must not change the held-out documents"
    assert not torch.equal(docs[0][1], docs[1][1]), "the seed still orders the training stream"
    other = Trainer(TrainConfig(out=str(tmp_path / "split"), seed=0, split_seed=5, **small))
    assert list(other.val_data.docs) != docs[0][0]

    # A run saved before split_seed existed held out documents by its seed; resuming keeps them.
    run = tmp_path / "old"
    train(TrainConfig(out=str(run), seed=3, split_seed=3, **{**small, "steps": 1, "save_every": 1}))
    state_file = run / "checkpoints" / _latest(run) / "trainer" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["split_seed"]
    state_file.write_text(json.dumps(state))
    args = argparse.Namespace(resume=str(run), config=None)
    cfg, resume = config_from_args(args)
    assert resume and cfg.split_seed == 3 and cfg.seed == 3
    assert cfg.identity_changes(state["config"]) == {}
    # another split would train on other documents: refused, naming the field, by both paths
    for split in (0, 7):
        with pytest.raises(ConfigError, match="split_seed: 3 -> %d" % split):
            Trainer(cfg.replace(split_seed=split), resume=True)
    args = argparse.Namespace(resume=str(run), config=None, split_seed=9)
    with pytest.raises(ConfigError, match="split_seed: 3 -> 9"):
        Trainer(config_from_args(args)[0], resume=True)


# --- a kill in the middle of a write -------------------------------------------------------------

def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "latest").write_text("step_00000004\n")  # killed after its first checkpoint ...
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1')  # ... while appending a line
    with pytest.warns(UserWarning, match="metrics.jsonl: its last line is cut short"):
        assert main(["compare", f"torn={run}", f"ref={reference}", "--out", str(tmp_path / "cmp")]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    assert _train_losses(run) == _train_losses(reference)  # the same curve, every step once


def test_a_damaged_metrics_line_is_named(tmp_path):
    from mixerzoo.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)


def test_a_cut_rng_file_is_named(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    rng = run / "checkpoints" / "step_00000004" / "trainer" / "rng_rank0.safetensors"
    (run / "latest").write_text("step_00000004\n")
    rng.write_bytes(rng.read_bytes()[:40])
    err = _cli_error(["--resume", str(run)], capsys)
    assert "rng_rank0.safetensors" in err and "cannot read the RNG state" in err


def test_a_resumed_run_keeps_its_kernels(data, tmp_path, monkeypatch):
    values = {**data, **BASE, "steps": 4, "save_every": 2, "val_every": 2}
    run = tmp_path / "run"
    monkeypatch.setenv("MIXERZOO_FUSED", "0")
    assert main(["train", *_flags(values), "--out", str(run)]) == 0
    monkeypatch.delenv("MIXERZOO_FUSED")  # the default changes; the run's choice must not
    (run / "latest").write_text("step_00000002\n")
    assert main(["train", "--resume", str(run)]) == 0
    saved = json.loads((run / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert saved["kernels"] == "reference"
