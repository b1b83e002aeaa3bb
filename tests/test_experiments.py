"""Experiment files, --set / --config, resuming a sweep and running it on several processes."""

from __future__ import annotations

import json

import pytest

from mixerzoo.cli import main
from mixerzoo.evals.synthetic import run_synthetic
from mixerzoo.evals.synthetic.experiments import (ExperimentError, build_experiment, experiment_files,
                                                  list_presets, load_preset, parse_sets)

# The shipped files at a scale a CPU runs in seconds: tiny widths, few steps, two mixers.
SMALL = {"d_model": [32], "lr": [3e-3], "seeds": 2, "steps": 3, "eval_every": 3, "eval_batches": 1,
         "eval_batch_size": 8, "batch_size": 8, "mixers": ["softmax", "loglinear_adaptive"],
         "precision": "fp32", "device": "cpu", "progress": False}
SMALL_TASK = {"mqar": {"seq_len": [32], "vocab_size": 64, "num_kv_pairs": 2},
              "selective_copy": {"seq_len": [32], "num_data_tokens": 4}}


def test_every_shipped_preset_is_a_valid_sweep():
    assert {"mqar", "mqar-width", "selective-copy", "length-generalisation"} <= set(experiment_files())
    for name in list_presets():
        data = load_preset(name)
        cfg = build_experiment(data)
        if name in experiment_files():
            assert isinstance(data["version"], int) and data["description"].strip()
            assert {"h200", "cpu"} <= set(data["expected_time"]), name


@pytest.mark.parametrize("name", sorted(experiment_files()))
def test_shipped_preset_runs_end_to_end_at_reduced_scale(name, tmp_path):
    data = load_preset(name)
    cfg = build_experiment(data, SMALL, SMALL_TASK[data["task"]], out_dir=str(tmp_path))
    results = run_synthetic(cfg)
    assert len(results["runs"]) == 2 * 2 and results["complete"]
    assert (tmp_path / "results.json").is_file() and (tmp_path / "accuracy.png").is_file()
    if data.get("eval_length_factors"):
        rows = [r for r in results["runs"] if r["length_acc"]]
        assert rows and set(rows[0]["length_acc"]) == {"64", "128", "256"}
        assert (tmp_path / "length.csv").is_file() and (tmp_path / "length.png").is_file()


def test_set_items_and_aliases():
    sets = parse_sets(["seq_len=128", "num_kv_pairs=32", "d_model=128", "steps=20000", "mixers=[softmax, mamba2]"])
    cfg = build_experiment({"base": "quick"}, sets, task="mqar")
    assert cfg.seq_lens == (128,) and cfg.task.seq_len == 128 and cfg.task.num_kv_pairs == 32
    assert cfg.d_models == (128,) and cfg.max_steps == 20000 and cfg.mixers == ("softmax", "mamba2")
    assert cfg.task_overrides == {128: {}}  # the quick sweep's per-length pairs yield to the set value
    assert build_experiment({"seeds": 3}).seeds == (0, 1, 2)


def test_later_layers_win_and_files_are_read(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("task: mqar\nseq_len: [64, 128]\nper_length: {64: {num_kv_pairs: 4}, 128: {num_kv_pairs: 8}}\n"
                   "d_model: 32\nsteps: 10\n")
    from mixerzoo.evals.synthetic.experiments import read_experiment

    cfg = build_experiment(read_experiment(exp), parse_sets(["steps=7"]))
    assert cfg.max_steps == 7 and cfg.task_for(128).num_kv_pairs == 8 and cfg.task_for(64).num_kv_pairs == 4


@pytest.mark.parametrize("layer, match", [
    ({"seq_lenn": 64}, r"unknown experiment key\(s\) 'seq_lenn' \(did you mean 'seq_len'\?\).*known for task"),
    ({"num_data_tokens": 4}, r"'num_data_tokens'.*known for task 'mqar'"),  # another task's field
    ({"seeds": 0}, r"seeds=0"),
    ({"task": "nope"}, r"nope"),
    ({"base": "fast"}, r"base='fast'"),
    ({"num_kv_pairs": -1}, r"num_kv_pairs"),
    ({"eval_length_factors": [1]}, r"eval_length_factors"),
])
def test_bad_experiment_keys_are_refused_with_the_key_named(layer, match):
    with pytest.raises(ValueError, match=match):
        build_experiment(layer)


def test_bad_files_and_set_items(tmp_path):
    from mixerzoo.evals.synthetic.experiments import read_experiment

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        read_experiment(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ExperimentError, match="mapping"):
        read_experiment(bad)
    with pytest.raises(ExperimentError, match="does not exist"):
        read_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        parse_sets(["steps"])


def test_cli_set_and_unknown_key(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["synth", "mqar", "--preset", "demo", "--device", "cpu", "--out", str(out), "--set",
            "seq_len=32", "num_kv_pairs=2", "d_model=16", "steps=2", "eval_every=2", "eval_batches=1",
            "eval_batch_size=8", "batch_size=8", "lr=[1e-3]", "mixers=[softmax]", "progress=false"]
    assert main(args) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["task"]["seq_len"] == 32 and cfg["max_steps"] == 2 and cfg["mixers"] == ["softmax"]
    assert main(args) == 0  # the rerun keeps the finished run
    assert "1 of 1 runs were finished earlier" in capsys.readouterr().out
    assert main(["synth", "--set", "stepz=3"]) == 2
    assert "'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["synth", "--list-presets"]) == 0
    assert "mqar-width (version 1)" in capsys.readouterr().out


def _tiny(tmp_path, **kw):
    return build_experiment({"base": "demo"}, {**SMALL, "seq_len": [32], "num_kv_pairs": 2, "vocab_size": 64,
                                               "mixers": ["softmax", "mamba2"], "seeds": 1, **kw},
                            task="mqar", out_dir=str(tmp_path), time_limit_s=None)


def test_resume_keeps_finished_runs_and_trains_the_rest(tmp_path, monkeypatch):
    import mixerzoo.evals.synthetic.sweep as sweep

    first = run_synthetic(_tiny(tmp_path))
    real = sweep.train_one
    trained = []
    monkeypatch.setattr(sweep, "train_one", lambda *a, **k: trained.append(1) or real(*a, **k))
    again = run_synthetic(_tiny(tmp_path))
    assert not trained and all(r["resumed"] for r in again["runs"])
    assert [r["best_acc"] for r in again["runs"]] == [r["best_acc"] for r in first["runs"]]
    # one more mixer: only its run trains; a changed setting (steps) trains everything again
    more = run_synthetic(_tiny(tmp_path, mixers=["softmax", "mamba2", "linear"]))
    assert len(trained) == 1 and [r["resumed"] for r in more["runs"]] == [True, True, False]
    run_synthetic(_tiny(tmp_path, steps=2, eval_every=2, mixers=["softmax"]))
    assert len(trained) == 2
    # resume=False trains again even where the settings match
    run_synthetic(_tiny(tmp_path, resume=False, mixers=["softmax"]))
    assert len(trained) == 3


def test_a_corrupt_results_file_is_reported_and_the_runs_trained_again(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.warns(UserWarning, match="could not be read"):
        results = run_synthetic(_tiny(tmp_path, mixers=["softmax"]))
    assert not results["runs"][0]["resumed"]


def test_workers_run_in_processes_and_match_one_process(tmp_path):
    serial = run_synthetic(_tiny(tmp_path / "a"))
    pooled = run_synthetic(_tiny(tmp_path / "b", workers=2))
    assert [r["key"] for r in pooled["runs"]] == [r["key"] for r in serial["runs"]]
    for a, b in zip(serial["runs"], pooled["runs"]):
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)


def test_mqar_width_builds_every_mixer_at_every_width():
    from mixerzoo.evals.synthetic.training import _build

    cfg = build_experiment(load_preset("mqar-width"))
    for d in cfg.d_models:
        for mixer in cfg.mixers:
            _build(mixer, cfg, cfg.task, d)  # a mixer too large for the width fails here


def test_a_run_key_follows_what_the_mixer_name_stands_for():
    # a name that comes to mean another model (other options, another init rule) must not
    # match the runs of the old one when a sweep is resumed
    import torch

    from mixerzoo.evals.synthetic.presets import preset
    from mixerzoo.evals.synthetic.sweep import plan_runs
    from mixerzoo.registry import REGISTRY, register_mixer

    cfg = preset("demo", mixers=("key_probe",))
    keys = []
    try:
        for init, options in ((None, {}), ("llama", {}), ("llama", {"lambda_mode": "fixed"})):
            register_mixer("key_probe", "mixerzoo.mixers.loglinear:LogLinearMamba2", init=init, overwrite=True,
                           **options)
            keys.append(plan_runs(cfg, ["key_probe"], torch.device("cpu"))[0].key)
    finally:
        if "key_probe" in REGISTRY.names():
            REGISTRY.remove("key_probe")
    assert len(set(keys)) == 3
