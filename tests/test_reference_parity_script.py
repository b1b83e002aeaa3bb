"""scripts/reference_parity.py end to end on the CPU at a toy scale (softmax beside transformers'
Llama): both sides train on the same batches, the table and files are written, a rerun keeps the
finished runs, and a gap above the tolerance is an exit status of 1."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reference_parity.py"


def _script():
    spec = importlib.util.spec_from_file_location("reference_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_script_trains_both_sides_and_resumes(tmp_path, capsys):
    from mixerzoo.data.toy_text import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=400)
    out = tmp_path / "parity"
    args = ["--data", str(corpus), "--out", str(out), "--pairs", "softmax", "--lrs", "1e-3", "--size", "tiny",
            "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--val-windows", "4", "--val-every", "2",
            "--device", "cpu", "--tolerance", "5"]
    parity = _script()
    assert parity.main(args) == 0
    result = json.loads((out / "parity.json").read_text())
    (row,) = result["rows"]
    assert row["pair"] == "softmax" and row["reference"] == "transformers LlamaForCausalLM"
    assert row["zoo_params"] == row["reference_params"]  # the same shape on both sides
    runs = {r["side"]: r for r in result["runs"]}
    assert [v["step"] for v in runs["zoo"]["val"]] == [2, 4] and runs["reference"]["finished"]
    assert runs["zoo"]["batches_sha256"] == runs["reference"]["batches_sha256"]  # the same batches
    assert (out / "parity.png").is_file() and "| `softmax` |" in (out / "parity.md").read_text()
    capsys.readouterr()

    assert parity.main(args) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
    # another pair list keeps the finished pair's runs; a pair whose reference cannot run here
    # (mamba-ssm is not installed) is reported and makes the exit status 1
    import importlib.util as iu

    if iu.find_spec("mamba_ssm") is None:
        assert parity.main(args[:5] + ["softmax,mamba2"] + args[6:]) == 1
        out = capsys.readouterr().out
        assert out.count("finished earlier") == 2 and "not compared" in out and "mamba2" in out
    # the same runs judged with a tolerance no pair can meet
    assert parity.main(args[:-1] + ["0"]) == 1 or abs(row["gap"]) == 0
