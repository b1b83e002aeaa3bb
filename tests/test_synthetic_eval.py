"""The synthetic evaluator: its small pieces on fake numbers, and a micro sweep end to end."""

from __future__ import annotations

import csv
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from mixerzoo.evals.plot import plot_summary
from mixerzoo.evals.synthetic import (
    PRESETS,
    train_one,
    RUN_COLUMNS,
    SUMMARY_COLUMNS,
    EarlyStopper,
    SyntheticRunConfig,
    format_table,
    masked_accuracy,
    preset,
    run_synthetic,
    select_best_lr,
    summarise,
    warmup_cosine,
)
from mixerzoo.tasks import MQARConfig, SelectiveCopyConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- small pieces


def test_early_stopper_stops_at_first_crossing():
    stopper = EarlyStopper(threshold=0.99)
    accs = [0.10, 0.55, 0.98, 0.991, 0.40]
    stopped_at = None
    for i, acc in enumerate(accs):
        if stopper.update(step=(i + 1) * 10, acc=acc):
            stopped_at = i
            break
    assert stopped_at == 3
    assert stopper.best_acc == 0.991 and stopper.best_step == 40
    assert stopper.history == [(10, 0.10), (20, 0.55), (30, 0.98), (40, 0.991)]


def test_early_stopper_never_crossing_keeps_best():
    stopper = EarlyStopper(threshold=0.99)
    assert not any(stopper.update(s, a) for s, a in [(1, 0.3), (2, 0.9), (3, 0.7)])
    assert (stopper.best_acc, stopper.best_step, stopper.last_acc) == (0.9, 2, 0.7)
    exact = EarlyStopper(threshold=0.99)
    assert exact.update(5, 0.99)  # reaching the threshold is enough


def test_warmup_cosine():
    total, warmup = 100, 10
    lrs = [warmup_cosine(s, total, warmup) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert warmup_cosine(55, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(total, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, total, 0) == pytest.approx(1.0)


def test_masked_accuracy():
    logits = torch.full((1, 4, 5), -1.0)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 0] = logits[0, 3, 4] = 1.0
    labels = torch.tensor([[2, -100, 1, 4]])
    assert masked_accuracy(logits, labels) == (2, 3)


def _run(mixer, seed, lr, acc, steps=100, seq_len=64, d_model=64, params=1000):
    return dict(mixer=mixer, seed=seed, lr=lr, best_acc=acc, steps=steps, best_step=steps,
                seq_len=seq_len, d_model=d_model, x=seq_len, params=params)


def test_best_lr_per_seed_and_summary():
    runs = [
        _run("a", 0, 1e-3, 0.50), _run("a", 0, 1e-2, 0.80),
        _run("a", 1, 1e-3, 0.90), _run("a", 1, 1e-2, 0.60),
        # a tie on accuracy goes to the run that got there in fewer steps
        _run("b", 0, 1e-3, 1.00, steps=300), _run("b", 0, 1e-2, 1.00, steps=120),
    ]
    select_best_lr(runs)
    assert [r["selected"] for r in runs] == [False, True, True, False, False, True]
    rows = {r["mixer"]: r for r in summarise(runs)}
    assert rows["a"]["acc_mean"] == pytest.approx(0.85)
    assert rows["a"]["acc_std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert rows["a"]["best_lrs"] == [1e-2, 1e-3] and rows["a"]["n_seeds"] == 2
    assert rows["b"]["acc_std"] == 0.0 and rows["b"]["best_lrs"] == [1e-2]


# ------------------------------------------------------------------------------ config


def test_config_validation():
    task = MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=2)
    with pytest.raises(TypeError):
        SyntheticRunConfig(task=task, learning_rate=1e-3)  # unknown field
    with pytest.raises(ValueError, match="eval_seed"):
        SyntheticRunConfig(task=task, seeds=(0, 5), eval_seed=5)
    with pytest.raises(ValueError, match="x_axis"):
        SyntheticRunConfig(task=task, x_axis="width")
    with pytest.raises(ValueError, match="explicit widths"):
        SyntheticRunConfig(task=task, x_axis="d_model")
    with pytest.raises(ValueError, match="seq_len=6"):
        SyntheticRunConfig(task=task, seq_lens=(16, 6))  # too short for the kv pairs
    with pytest.raises(ValueError, match="not in seq_lens"):
        SyntheticRunConfig(task=task, seq_lens=(16,), task_overrides={32: {"num_kv_pairs": 4}})
    with pytest.raises(ValueError, match="learning_rates"):
        SyntheticRunConfig(task=task, learning_rates=(0.0,))
    cfg = SyntheticRunConfig(task="selective_copy", mixers="softmax")
    assert isinstance(cfg.task, SelectiveCopyConfig) and cfg.mixers == ("softmax",)
    assert cfg.seq_lens == (cfg.task.seq_len,)


def test_presets():
    demo = preset("demo")
    assert demo.mixers == ("all",) and demo.device == "cpu" and demo.seeds == (0,)
    assert demo.early_stop == 0.99 and len(demo.learning_rates) >= 2
    assert isinstance(demo.task, MQARConfig) and demo.task.vocab_size <= 256
    assert demo.time_limit_s is not None  # the demo has a wall-clock budget
    quick = preset("quick", mixers=("softmax", "mamba2"))
    assert quick.mixers == ("softmax", "mamba2")
    assert [quick.task_for(L).num_kv_pairs for L in quick.seq_lens] == [4, 8, 16]
    full = preset("full")
    assert full.x_axis == "d_model" and len(full.seeds) == 3 and len(full.learning_rates) == 4
    assert full.task.vocab_size == 8192 and full.task_for(512).num_kv_pairs == 64
    # overriding seq_lens drops overrides for lengths no longer swept
    short = preset("full", seq_lens=(64, 128))
    assert set(short.task_overrides) == {64, 128}
    sc = preset("demo", task="selective_copy", task_options={"num_data_tokens": 4})
    assert isinstance(sc.task, SelectiveCopyConfig) and sc.task.num_data_tokens == 4
    assert set(PRESETS) == {"demo", "quick", "full"}
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(TypeError, match="unknown"):
        preset("demo", steps=5)


# ---------------------------------------------------------------------------- end to end


def micro_config(tmp_path, **kw):
    task = MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=2, random_non_queries=False)
    base = dict(
        task=task, mixers=("softmax",), size="tiny", d_models=(32,), n_layers=1,
        seq_lens=(16,), learning_rates=(1e-3, 1e-2), seeds=(0, 1), max_steps=20,
        batch_size=8, eval_every=10, eval_batches=1, eval_batch_size=16, device="cpu",
        out_dir=str(tmp_path), progress=True,
    )
    return SyntheticRunConfig(**{**base, **kw})


def test_micro_sweep_writes_results(tmp_path):
    results = run_synthetic(micro_config(tmp_path))
    runs = results["runs"]
    assert len(runs) == 4  # 1 mixer × 1 length × 2 seeds × 2 lrs
    for run in runs:
        assert run["mixer"] == "softmax" and run["seq_len"] == 16 and run["d_model"] == 32
        assert run["params"] > 0 and run["params_total"] > run["params"]
        assert 0.0 <= run["best_acc"] <= 1.0 and run["best_acc"] >= run["final_acc"]
        assert run["steps"] == 20 or run["stop_reason"] == "threshold"
        assert [h["step"] for h in run["history"]][:2] == [10, 20][: len(run["history"])]
        assert math.isfinite(run["final_loss"]) and run["time_s"] > 0
    # Same seed -> same init and data: the two lrs of a seed share their model size.
    assert sum(r["selected"] for r in runs) == 2

    files = results["files"]
    data = json.loads(open(files["json"]).read())
    assert data["config"]["mixers"] == ["softmax"] and data["complete"] is True
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed
    assert data["config"]["task"]["task"] == "mqar"
    assert len(data["runs"]) == 4 and len(data["summary"]) == 1
    with open(files["runs_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and tuple(rows[0]) == RUN_COLUMNS
    with open(files["summary_csv"]) as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 1 and tuple(summary[0]) == SUMMARY_COLUMNS
    assert summary[0]["n_seeds"] == "2"
    with open(files["plot"], "rb") as f:
        assert f.read(8) == PNG_MAGIC

    table = format_table(results)
    assert "softmax" in table and "T=16" in table and "d=32" in table


def test_width_sweep_with_length_panels(tmp_path):
    cfg = micro_config(
        tmp_path, d_models=(16, 32), seq_lens=(16, 20), x_axis="d_model", seeds=(0,),
        learning_rates=(1e-3,), max_steps=4, eval_every=2, progress=False,
        task_overrides={20: {"num_kv_pairs": 3}},
    )
    results = run_synthetic(cfg)
    assert len(results["runs"]) == 4
    assert {(r["seq_len"], r["x"]) for r in results["summary"]} == {
        (16, 16), (16, 32), (20, 16), (20, 32)
    }
    assert {r["task"]["num_kv_pairs"] for r in results["runs"] if r["seq_len"] == 20} == {3}
    table = format_table(results)
    assert "T=16" in table and "T=20" in table and "d=16" in table and "d=32" in table
    with open(results["files"]["plot"], "rb") as f:
        assert f.read(8) == PNG_MAGIC


class _OracleMQAR(torch.nn.Module):
    """Answers MQAR perfectly: at each token, the token after that token's first occurrence."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(()))  # something for the optimizer to hold

    def forward(self, x):
        B, T = x.shape
        earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # s < t
        match = (x[:, :, None] == x[:, None, :]) & earlier  # [B, t, s]
        first = match.float().argmax(-1).clamp(max=T - 2)  # first s with x_s == x_t
        answer = x.gather(1, first + 1)
        logits = torch.nn.functional.one_hot(answer, self.vocab).float()
        return SimpleNamespace(logits=logits + 0 * self.w)


def test_early_stop_in_training_loop(tmp_path):
    cfg = micro_config(tmp_path, eval_every=5, out_dir=None, progress=False)
    task = cfg.task_for(16)
    eval_set = task.build(cfg.eval_seed).batches(2, 8)
    record = train_one(_OracleMQAR(task.vocab_size), task, eval_set, cfg, lr=1e-3, seed=0,
                       device=torch.device("cpu"))
    assert record["stop_reason"] == "threshold" and record["steps"] == 5
    assert record["best_acc"] == record["final_acc"] == 1.0 and record["best_step"] == 5


def test_time_limit_in_training(tmp_path):
    results = run_synthetic(
        micro_config(tmp_path, seeds=(0,), learning_rates=(1e-3,), time_limit_s=0.0,
                     out_dir=None, progress=False)
    )
    (run,) = results["runs"]
    # the first step (kernel compilation) is not counted: the cap stops the run at step 2
    assert run["stop_reason"] == "time_limit" and run["steps"] == 2 and len(run["history"]) == 1
    assert results["files"] == {} and results["complete"]
    # the table says that accuracies come from runs the cap cut short
    assert "1 of 1 runs were stopped by the 0 s time cap" in format_table(results)


class _SlowFirstStep(torch.nn.Module):
    """A model whose first forward pass takes 1 s, as a kernel compilation would."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)
        return SimpleNamespace(logits=self.embed(x))


def test_time_limit_does_not_count_the_first_step(tmp_path):
    # the cap (0.8 s) is below the first step (1 s) and far above the other five steps
    cfg = micro_config(tmp_path, max_steps=6, eval_every=3, time_limit_s=0.8, out_dir=None,
                       progress=False)
    task = cfg.task_for(16)
    eval_set = task.build(cfg.eval_seed).batches(2, 8)
    record = train_one(_SlowFirstStep(task.vocab_size), task, eval_set, cfg, lr=1e-3, seed=0,
                       device=torch.device("cpu"))
    assert record["stop_reason"] == "max_steps" and record["steps"] == 6
    assert record["first_step_s"] >= 1.0 and record["time_s"] >= record["first_step_s"]


def test_interrupted_sweep_keeps_finished_runs(tmp_path, monkeypatch):
    import mixerzoo.evals.synthetic as synthetic

    real_build, built = synthetic.sweep._build, []

    def build_then_fail(*args, **kwargs):
        built.append(1)
        if len(built) == 3:
            raise KeyboardInterrupt  # the sweep is stopped during its third run
        return real_build(*args, **kwargs)

    monkeypatch.setattr(synthetic.sweep, "_build", build_then_fail)
    cfg = micro_config(tmp_path, max_steps=4, eval_every=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_synthetic(cfg)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False and len(data["runs"]) == 2
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


class _NaNModel(torch.nn.Module):
    """Emits NaN logits: a stand-in for a run whose weights blew up."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)
        self.scale = torch.nn.Parameter(torch.tensor(float("nan")))

    def forward(self, x):
        return SimpleNamespace(logits=self.embed(x) * self.scale)


def test_divergence_is_recorded(tmp_path):
    cfg = micro_config(tmp_path, eval_every=5, out_dir=None, progress=False)
    task = cfg.task_for(16)
    eval_set = task.build(cfg.eval_seed).batches(1, 4)
    record = train_one(_NaNModel(task.vocab_size), task, eval_set, cfg, lr=1e-3, seed=0,
                       device=torch.device("cpu"))
    assert record["stop_reason"] == "diverged" and record["steps"] == 5
    assert len(record["history"]) == 1 and math.isnan(record["final_loss"])


def test_plot_width_sweep_with_panels(tmp_path):
    summary = [
        dict(mixer=m, seq_len=L, d_model=d, x=d, acc_mean=a, acc_std=0.05)
        for m, a in (("softmax", 0.9), ("mamba2", 0.5))
        for L in (64, 128) for d in (64, 128, 256)
    ]
    path = plot_summary(summary, tmp_path / "sub" / "acc.png", x_axis="d_model", title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="empty"):
        plot_summary([], tmp_path / "x.png")
