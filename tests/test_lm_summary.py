"""The LM comparison table: runs over seeds per mixer, unfinished runs left out of the means."""

import json
import math

import pytest

from mixerzoo.evals.lm_summary import collect_runs, format_markdown, main, summarise_lm, write_summary


def _run(out, mixer, seed, steps, target, val_bpb, acc=None, split_seed=0):
    run = out / f"{mixer}_s{seed}"
    run.mkdir(parents=True)
    config = {"mixer": mixer, "steps": target, "seed": seed}
    if split_seed is not None:  # None: a run saved before split_seed existed (split by seed)
        config["split_seed"] = split_seed
    (run / "train_config.json").write_text(json.dumps(config))
    lines = [{"step": s, "loss": 5.0 - s / 100, "tok_per_s": 1000.0 + s, "peak_mem_gib": 2.0}
             for s in range(1, steps + 1)]
    lines.append({"step": steps, "val_loss": val_bpb * 3, "val_bpb": val_bpb, "val_tokens": 10})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if acc is not None:
        res = out / f"eval_{mixer}_s{seed}" / "model_dir"
        res.mkdir(parents=True)
        body = {"results": {"mixerzoo_choice": {"alias": "x", "acc,none": acc, "acc_stderr,none": 0.02},
                            "mixerzoo_perplexity": {"bits_per_byte,none": 3.0 + acc}}}
        (res / "results_2026-01-01T00-00-00.json").write_text(json.dumps({"results": {"old": {"acc,none": 9.0}}}))
        (res / "results_2026-01-02T00-00-00.json").write_text(json.dumps(body))


def test_means_spreads_and_unfinished_runs(tmp_path):
    _run(tmp_path, "softmax", 0, 10, 10, 1.5, acc=0.30)
    _run(tmp_path, "softmax", 1, 10, 10, 1.7, acc=0.34)
    _run(tmp_path, "mamba2", 0, 10, 10, 1.2, acc=0.40)
    _run(tmp_path, "mamba2", 1, 4, 10, 9.9)  # stopped early: listed, not averaged
    (tmp_path / "cache").mkdir()  # not a run folder
    rows = collect_runs(tmp_path)
    assert [(r["mixer"], r["seed"], r["finished"]) for r in rows] == [
        ("mamba2", 0, True), ("mamba2", 1, False), ("softmax", 0, True), ("softmax", 1, True)]
    # the newest lm-eval results file counts; stderr entries are not metrics
    assert rows[2]["mixerzoo_choice/acc"] == 0.30 and "old/acc" not in rows[2]
    assert not any("stderr" in k for r in rows for k in r)
    by = {e["mixer"]: e for e in summarise_lm(rows)}
    assert by["softmax"]["n"] == 2 and by["softmax"]["seeds"] == [0, 1]
    assert math.isclose(by["softmax"]["final_val_bpb_mean"], 1.6)
    assert math.isclose(by["softmax"]["final_val_bpb_std"], 0.1414213562, rel_tol=1e-6)
    assert math.isclose(by["softmax"]["mixerzoo_choice/acc_mean"], 0.32)
    assert by["mamba2"]["n"] == 1 and by["mamba2"]["final_val_bpb_mean"] == 1.2
    assert by["mamba2"]["final_val_bpb_std"] is None and by["mamba2"]["unfinished"] == ["mamba2_s1"]
    assert by["softmax"]["mixerzoo_choice/acc_n"] == 2


def test_a_metric_missing_for_a_seed_and_mixed_splits_are_marked(tmp_path):
    _run(tmp_path, "mamba2", 0, 5, 5, 1.2, acc=0.30)
    _run(tmp_path, "mamba2", 1, 5, 5, 1.3)  # its lm-eval failed: no results file
    rows = collect_runs(tmp_path)
    summary = summarise_lm(rows)
    assert summary[0]["mixerzoo_choice/acc_n"] == 1 and summary[0]["final_val_bpb_n"] == 2
    table = format_markdown(summary, rows)
    assert "0.300 (1 of 2 seeds)" in table and "Warning" not in table
    _run(tmp_path, "softmax", 1, 5, 5, 1.6, split_seed=None)  # held out by its seed 1
    rows = collect_runs(tmp_path)
    assert [r["split_seed"] for r in rows] == [0, 0, 1]
    assert "validated on different documents (split seeds [0, 1])" in format_markdown(summarise_lm(rows), rows)


def test_files_and_command(tmp_path, capsys):
    _run(tmp_path, "loglinear_adaptive", 0, 5, 5, 1.25, acc=0.33)
    paths = write_summary(tmp_path)
    table = paths["md"].read_text()
    assert "| `loglinear_adaptive` | 0 | 1.2500 |" in table
    assert json.loads(paths["json"].read_text())["mixers"][0]["n"] == 1
    assert paths["csv"].read_text().splitlines()[0].startswith("mixer,seed,run")
    assert main([str(tmp_path)]) == 0
    assert "loglinear_adaptive" in capsys.readouterr().out


def test_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .*run"):
        write_summary(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        collect_runs(tmp_path / "missing")


def test_learning_rate_sweep_picks_each_mixers_best_rate(tmp_path, capsys):
    from mixerzoo.evals.lm_summary import best_lrs, collect_sweep, write_sweep

    def run(lr, mixer, seed, val_bpb, steps=10):
        _run(tmp_path / f"lr{lr}", mixer, seed, steps, 10, val_bpb)
        cfg = tmp_path / f"lr{lr}" / f"{mixer}_s{seed}" / "train_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lr": float(lr)}))

    run("3e-4", "softmax", 0, 1.6)
    run("1e-3", "softmax", 0, 1.4)
    run("1e-3", "softmax", 1, 1.5)
    run("3e-3", "softmax", 0, 1.0, steps=3)
    # diverged as the trainer leaves it: the last logged loss is nan and the run stopped early
    metrics = tmp_path / "lr3e-3" / "softmax_s0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 4, "loss": float("nan")}) + "\n")
    run("3e-4", "mamba2", 0, 1.3)
    run("1e-3", "mamba2", 0, 1.35)
    run("3e-3", "mamba2", 0, 1.2, steps=4)  # unfinished at one rate: mamba2 is not ready
    sweep = collect_sweep(tmp_path)
    assert sorted(sweep) == [3e-4, 1e-3, 3e-3]
    assert best_lrs(sweep) == {"softmax": 1e-3, "mamba2": None}
    # only the rates and mixers asked for: without the unfinished 3e-3, mamba2 has its best rate
    assert best_lrs(collect_sweep(tmp_path, [3e-4, 1e-3], ["mamba2"]), ["mamba2"]) == {"mamba2": 3e-4}
    assert main([str(tmp_path), "--best-lrs", "--lrs", "3e-4 1e-3", "--mixers", "mamba2"]) == 0
    assert capsys.readouterr().out == "mamba2 3e-4\n"
    (tmp_path / "lr0.001").mkdir()  # the same rate spelt twice
    with pytest.raises(ValueError, match="same learning rate"):
        collect_sweep(tmp_path)
    (tmp_path / "lr0.001").rmdir()
    assert main([str(tmp_path), "--best-lrs"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "softmax 1e-3\n" and "mamba2: the sweep has no finished" in captured.err
    paths = write_sweep(tmp_path)
    md = paths["md"].read_text()
    assert "| `softmax` | 4.8000 | 4.2000 | diverged | 0.001 |" in md
    assert "| `mamba2` | 3.9000 | 4.0500 | 3.6000 (unfinished) | – |" in md, md
    body = json.loads(paths["json"].read_text())
    (entry,) = body["mixers"]
    assert entry["mixer"] == "softmax" and entry["seeds"] == [0, 1]
    assert math.isclose(entry["final_val_bpb_mean"], 1.45)
