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


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_runs_evaluates_summarises_and_resumes(tmp_path):
    from mixerzoo.tasks.toy_text import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=3000)
    out = tmp_path / "lm"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "MIXERS": "softmax", "EVAL_ARGS": "--limit 4", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "CUDA_VISIBLE_DEVICES": ""}

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
