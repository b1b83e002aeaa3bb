"""scripts/lm_compare.sh end to end on the CPU at a toy scale: the runs, lm-eval, the table,
and a rerun that keeps what finished."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lm_compare.sh"

pytest.importorskip("lm_eval")


def _script_env(**extra: str) -> dict[str, str]:
    """The environment the scripts run in: this venv's python3 first, no GPU, no hub."""
    bindir = Path(sys.executable).parent
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_runs_evaluates_summarises_and_resumes(tmp_path):
    from mixerzoo.data.toy_text import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=3000)
    out = tmp_path / "lm"
    env = _script_env(MIXERS="softmax", EVAL_ARGS="--limit 4")

    def run(rc: int = 0, **extra: str) -> str:
        proc = subprocess.run(["bash", str(SCRIPT), str(corpus), "byte", str(out), "2", "tiny", "1"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run()
    assert "== softmax seed 0\n" in first
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["runs"]
    assert row["run"] == "softmax_s0" and row["finished"] and row["steps"] == 2
    assert "mixerzoo_choice/acc" in row  # lm-eval ran and its results were read
    assert (out / "compare" / "compare.png").is_file() and (out / "summary.md").is_file()

    # The checkpoints may be left behind (e.g. only metrics copied back): still finished.
    shutil.rmtree(out / "softmax_s0" / "checkpoints")
    (out / "softmax_s0" / "latest").unlink()
    second = run()
    assert "softmax seed 0: finished earlier" in second
    assert "Running loglikelihood" in first
    assert "Running loglikelihood" not in second  # its lm-eval results were kept, not redone

    # A run that fails is reported and the others go on; the exit status says so.
    # So does a run folder that cannot be read ('latest' names a checkpoint that is gone).
    (out / "linear_s0").mkdir()
    (out / "linear_s0" / "latest").write_text("step_00000001\n")
    third = run(rc=1, MIXERS="nosuchmixer linear softmax")
    assert "nosuchmixer seed 0: training failed" in third and "softmax seed 0: finished earlier" in third
    assert "linear seed 0: error: " in third
    assert "failed runs: nosuchmixer/s0 linear/s0" in third


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_compare_gpu_reports_a_failed_part_and_still_runs_the_others(tmp_path):
    # python3 replaced by a stub that records its arguments and fails only for the mqar sweep
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    out = tmp_path / "out"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    f'for a in "$@"; do [ "$a" = "{out}/mqar" ] && exit 3; done\nexit 0\n')
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "CALLS": str(calls), "PATH": f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = SCRIPT.with_name("compare_gpu.sh")
    proc = subprocess.run(["bash", str(script), "data", "tok", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mqar: exit 3" in proc.stdout and "some parts failed" in proc.stdout
    for name in ("mqar-width", "selective-copy", "length-generalisation"):
        assert f"{name}: exit 0" in proc.stdout and f"--out {out}/{name}" in calls.read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sweep_trains_every_rate_then_seeds_at_the_best(tmp_path):
    from mixerzoo.data.toy_text import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=1000)
    out = tmp_path / "sweep"
    env = _script_env(MIXERS="softmax", LRS="1e-3 3e-2", EVAL="0")
    script = SCRIPT.with_name("lm_sweep.sh")
    proc = subprocess.run(["bash", str(script), str(corpus), "byte", str(out), "2", "tiny", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    body = json.loads((out / "sweep.json").read_text())
    best = body["best_lr"]["softmax"]
    assert best in (1e-3, 3e-2)
    assert (out / "lr1e-3" / "softmax_s0").is_dir() and (out / "lr3e-2" / "softmax_s0").is_dir()
    at_best = sorted(p.parent.name + "/" + p.name for p in out.glob("lr*/softmax_s1"))
    assert at_best == [f"lr{'1e-3' if best == 1e-3 else '3e-2'}/softmax_s1"]
    (entry,) = body["mixers"]
    assert entry["seeds"] == [0, 1]
    assert (out / "compare" / "compare.png").is_file() and "best lr" in (out / "sweep.md").read_text()
    # a single cache of tokens serves every rate; EVAL=0 left lm-eval out
    assert not (out / "lr1e-3" / "cache").exists() and (out / "cache").is_dir()
    assert not list(out.glob("lr*/eval_*"))
