"""The ``mixerzoo`` command: each subcommand's output, files and exit codes."""

from __future__ import annotations

import json

import pytest
import torch

import mixerzoo
from mixerzoo.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in mixerzoo.list_mixers():
        assert name in out


def test_params_table_and_json(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["params", "--size", "350m", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "loglinear_adaptive" in out and "deviation" in out
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == len(mixerzoo.list_mixers()) and all(abs(r["deviation"]) <= 0.01 for r in rows)


def test_unknown_size_is_an_error_not_a_traceback(capsys):
    assert main(["params", "--size", "9b"]) == 2
    assert "known sizes" in capsys.readouterr().err


def test_unknown_mixer(capsys):
    assert main(["params", "--size", "tiny", "--mixers", "softmx"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_synth_writes_files(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["synth", "mqar", "--preset", "demo", "--mixers", "softmax", "--steps", "10",
                 "--device", "cpu", "--out", str(out), "--time-limit", "0"])
    assert code == 0
    assert {"results.json", "results.csv", "summary.csv"} <= {p.name for p in out.iterdir()}
    assert any(p.suffix == ".png" for p in out.iterdir())
    assert "softmax" in capsys.readouterr().out
    # --time-limit 0 lifts the demo preset's cap
    assert json.loads((out / "results.json").read_text())["config"]["time_limit_s"] is None


def test_synth_refuses_a_negative_time_limit(capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "mqar", "--time-limit", "-1"])
    assert e.value.code == 2 and "seconds >= 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_without_gpu_says_so(capsys):
    assert main(["bench", "kernels", "--seq-lens", "2048"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_demo_lm_trains_and_evaluates(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "lm"
    assert main(["demo", "--lm", "--steps", "4", "--eval-limit", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mixerzoo_choice" in text and "bits_per_byte" in text and "validation: loss" in text
    assert (out / "run" / "latest").is_file() and (out / "run" / "loss.png").is_file()


def test_loss_plot_zooms_on_the_runs_near_the_best_and_draws_every_run(tmp_path):
    from mixerzoo.train.metrics import near_best, plot_runs

    assert near_best({"a": 3.70, "b": 3.80, "c": 3.90, "d": 4.8}) == {"a", "b"}
    assert near_best({"nan": float("nan"), "a": 2.0, "b": 2.2}) == {"a"}  # a diverged run is never best
    assert near_best({"only": 2.0}) == {"only"} and near_best({}) == set()

    def run(final_val):
        return [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0, "val_loss": final_val + 1},
                {"step": 4, "loss": 5.0, "val_loss": final_val}]

    # more runs than any qualitative colour map has colours: every one is still drawn
    runs = {f"r{i}": run(3.0 + i / 10) for i in range(25)}
    drawn = plot_runs(runs, tmp_path / "many.png")
    assert drawn["all"] == list(runs) and drawn["near_best"] == ["r0", "r1"]
    assert (tmp_path / "many.png").is_file()
    train_only = [{"step": i, "loss": 5.0 - i} for i in range(1, 4)]
    assert plot_runs({"x": train_only}, tmp_path / "train_only.png") == {"all": ["x"], "near_best": []}
    assert plot_runs({"empty": []}, tmp_path / "nothing.png")["all"] == []  # nothing to draw: no file
    assert not (tmp_path / "nothing.png").exists()


def test_compare_runs_writes_gaps_and_plot(tmp_path, capsys):
    def run(name, losses):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": i + 1, "loss": v, "tok_per_s": 100.0} for i, v in enumerate(losses)]
        rows.append({"step": len(losses), "val_loss": losses[-1] + 0.1, "val_bpb": 1.0})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    a = run("a", [4.0, 3.0, 2.0, 2.0])
    b = run("b", [4.0, 3.3, 2.0, 1.0])
    out = tmp_path / "cmp"
    assert main(["compare", f"ref={a}", str(b / "metrics.jsonl"), "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference"] == "ref"
    row = summary["runs"]["metrics.jsonl"]
    assert abs(row["max_rel_gap"] - 0.5) < 1e-9 and abs(row["mean_rel_gap"] - 0.15) < 1e-9
    assert row["final_val_loss"] == 1.1 and (out / "compare.png").is_file()
    assert "gap to ref: max 50.00%" in capsys.readouterr().out
    # a missing run and an output path that is a file are refused before anything is written
    assert main(["compare", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "cmp2")]) == 2
    assert "no " in capsys.readouterr().err and not (tmp_path / "cmp2").exists()
    assert main(["compare", str(a), "--out", str(a / "metrics.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_misspelt_flag_gets_the_closest_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--seq-length", "32", "--data", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mixerzoo train: error: unrecognized arguments: '--seq-length' (did you mean '--seq-len'?), 32" in err
    with pytest.raises(SystemExit):
        main(["params", "--size", "125m", "--jsn", "x"])
    assert "(did you mean '--json'?)" in capsys.readouterr().err
