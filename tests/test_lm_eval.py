"""lm-eval integration: the bundled offline tasks, the ``mixerzoo`` LM against direct
computation from the model's logits, and ``mixerzoo eval`` (lm-eval's CLI in process)."""

from __future__ import annotations

import json
import math
import os
import shutil

# Nothing here may reach the network: the bundled tasks read files shipped with the package.
# Set before lm-eval / datasets / huggingface_hub read them at import.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from lm_eval.api.instance import Instance  # noqa: E402

from mixerzoo import build_model  # noqa: E402
from mixerzoo.evals import lm_eval as mz_eval  # noqa: E402
from mixerzoo.evals.lm_tasks import BUNDLED, TASKS_DIR, make_data  # noqa: E402
from mixerzoo.data.tokenizers import byte_tokenizer  # noqa: E402

MIXERS = ["softmax", "loglinear_adaptive"]
TEXT = "the quick brown fox jumps over the lazy dog. " * 6


def _train_briefly(name: str):
    """A tiny model that has memorised TEXT (a second of Adam): its greedy continuations are
    far from ties, so generation comparisons are exact, and not degenerate like a random model's."""
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=257)
    ids = torch.tensor([byte_tokenizer().encode(TEXT)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=MIXERS)
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    _train_briefly(request.param).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return mz_eval.MixerZooLM(pretrained=str(ckpt), device="cpu")


def _direct_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) and whether cont is the greedy choice, straight from the logits."""
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]  # position t predicts token t + 1
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


# --- the bundled task suite ----------------------------------------------------------------
def test_bundled_task_files_are_indexed_and_regenerable():
    # lm-eval skips a YAML it cannot parse with only a debug log: check every name is found.
    from lm_eval.tasks import TaskManager

    found = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks
    assert set(BUNDLED) <= set(found), f"missing from the index: {set(BUNDLED) - set(found)}"
    for name, rows in make_data.files().items():
        assert (TASKS_DIR / name).read_text(encoding="utf-8") == make_data.render(rows), f"{name} is stale"
    choice = make_data.files()["choice.test.jsonl"]
    assert all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in choice)
    assert {r["kind"] for r in choice} == set(make_data.KINDS)


def _check_results(results: dict, limit: int) -> None:
    res = results["results"]
    assert {"mixerzoo_choice", "mixerzoo_perplexity"} <= set(res)
    assert 0.0 <= res["mixerzoo_choice"]["acc,none"] <= 1.0
    assert 0.0 <= res["mixerzoo_choice"]["acc_norm,none"] <= 1.0
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        value = res["mixerzoo_perplexity"][metric]
        assert math.isfinite(value) and value > 0, (metric, value)
    assert results["n-samples"]["mixerzoo_choice"]["effective"] == limit


def test_bundled_tasks_through_evaluate(ckpt):
    results = mz_eval.evaluate(str(ckpt), ["mixerzoo_offline"], limit=6, batch_size=4, device="cpu")
    _check_results(results, 6)
    table = mz_eval.format_results(results)
    assert "mixerzoo_choice" in table and "bits_per_byte" in table


def test_bundled_tasks_through_registry_name(ckpt):
    # lm-eval builds the model itself from the registered name and a model_args string
    import lm_eval

    results = lm_eval.simple_evaluate(
        model="mixerzoo", model_args=f"pretrained={ckpt}", device="cpu", limit=4,
        tasks=["mixerzoo_choice", "mixerzoo_perplexity"],
        task_manager=mz_eval.task_manager(["mixerzoo_choice"]), log_samples=False)
    _check_results(results, 4)


# --- the LM wrapper against direct computation ---------------------------------------------
def test_loglikelihood_matches_logits(lm, ckpt):
    tok, model = lm.tokenizer, lm.model
    pairs = [("the quick", " brown fox"), ("the lazy", " cat jumps"), ("over the lazy dog.", " the"),
             ("", "the quick")]  # empty context: lm-eval conditions on EOS (the document separator)
    got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        ctx_ids = tok.encode(ctx) if ctx else [tok.eos_token_id]
        want, want_greedy = _direct_logprob(model, ctx_ids, tok.encode(cont))
        assert logprob == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy
    assert got[0][1] and not got[1][1]  # the memorised text is greedy, a novel word is not
    # lm-eval right-pads a batch and passes no mask: results must not depend on the batch size
    batched = mz_eval.MixerZooLM(pretrained=str(ckpt), device="cpu", batch_size=4)
    again = batched.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert [g for _, g in again] == [g for _, g in got]
    assert [lp for lp, _ in again] == pytest.approx([lp for lp, _ in got], abs=1e-4)


def test_loglikelihood_rolling_matches_logits(lm):
    tok, model = lm.tokenizer, lm.model
    docs = ["the quick brown fox jumps over the lazy dog.", "a lazy fox"]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    for doc, value in zip(docs, got):
        # every token of the document, the first one predicted from EOS
        want, _ = _direct_logprob(model, [tok.eos_token_id], tok.encode(doc))
        assert value == pytest.approx(want, abs=1e-4)


def _greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([tok.encode(prompt)])
    return tok.decode(model.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist())


def test_generate_until_matches_model_generate(lm, monkeypatch):
    tok, model = lm.tokenizer, lm.model
    full = _greedy_text(model, tok, "the quick", 40)
    assert full.startswith(" brown fox jumps over the lazy")  # the model did memorise TEXT
    gen = {"until": ["lazy"], "max_gen_toks": 40, "do_sample": False}
    nostop = {"until": ["XYZ"], "max_gen_toks": 40, "do_sample": False}  # runs past FIRST_CHUNK
    got = lm.generate_until(_requests("generate_until", [("the quick", gen), ("the quick", nostop)]),
                            disable_tqdm=True)
    assert got[0] == full.split("lazy")[0] == " brown fox jumps over the "
    assert got[1] == full and len(got[1].encode()) == 40  # max_gen_toks respected (1 byte = 1 token)
    # prompts of different lengths in one batch: lm-eval left-pads them, we strip the padding
    prompts = ["the quick", "over the lazy", "the"]
    batched = mz_eval.MixerZooLM(pretrained=lm.pretrained, device="cpu", batch_size=3)
    short = {"until": ["XYZ"], "max_gen_toks": 12, "do_sample": False}
    seen, generate = [], batched.model.generate

    def spy(ids, **kw):
        seen.append(ids[0].tolist())
        return generate(ids, **kw)

    monkeypatch.setattr(batched.model, "generate", spy)
    got = batched.generate_until(_requests("generate_until", [(p, short) for p in prompts]), disable_tqdm=True)
    assert got == [_greedy_text(model, tok, p, 12) for p in prompts]
    assert sorted(seen) == sorted(tok.encode(p) for p in prompts)  # no pad token reached the model
    # generation stops soon after the stop string instead of running to the token budget
    new = lm._generate_one(torch.tensor([tok.encode("the quick")]), 400, ["lazy"], {"do_sample": False})
    assert "lazy" in tok.decode(new.tolist()) and len(new) <= 2 * len(" brown fox jumps over the lazy")
    with pytest.raises(mz_eval.EvalError, match="num_beams"):
        lm.generate_until(_requests("generate_until", [("the", {**short, "num_beams": 2})]), disable_tqdm=True)


def test_random_model_and_model_object():
    lm = mz_eval.MixerZooLM(mixer="linear", size="tiny", device="cpu", max_length=64)
    assert lm.model.config.vocab_size == len(lm.tokenizer) == 257 and lm.max_length == 64
    ((logprob, _),) = lm.loglikelihood(_requests("loglikelihood", [("ab", "c")]), disable_tqdm=True)
    assert math.isfinite(logprob) and logprob < 0
    with pytest.raises(mz_eval.EvalError, match="pretrained=.*or mixer="):
        mz_eval.MixerZooLM(device="cpu")
    # a model object (its byte tokenizer inferred from the vocabulary) through evaluate()
    results = mz_eval.evaluate(build_model("mamba2", "tiny", vocab_size=257), "mixerzoo_choice", limit=2, device="cpu")
    assert 0.0 <= results["results"]["mixerzoo_choice"]["acc,none"] <= 1.0
    assert mz_eval.MixerZooLM(pretrained=build_model("softmax", "tiny", vocab_size=257)).max_length == 2048


def test_run_folder_resolves_to_its_checkpoint(ckpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "checkpoints" / "step_00000080")
    (run / "latest").write_text("step_00000080\n")
    lm = mz_eval.MixerZooLM(pretrained=str(run), device="cpu")
    assert lm.pretrained == str((run / "checkpoints" / "step_00000080").resolve())
    (run / "latest").write_text("step_99\n")  # names a checkpoint that is not there
    assert mz_eval.main(["--model", str(run), "--tasks", "mixerzoo_offline"]) == 2


# --- mixerzoo eval (lm-eval's CLI) ---------------------------------------------------------
@pytest.mark.parametrize("ckpt", ["softmax"], indirect=True)
def test_main_runs_lm_eval_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    rc = mz_eval.main(["--model", str(ckpt), "--tasks", "mixerzoo_offline", "--limit", "8",
                       "--output_path", str(out), "--batch_size", "2"])
    assert rc == 0
    (results_file,) = out.glob("**/results_*.json")
    results = json.loads(results_file.read_text())
    _check_results(results, 8)
    assert results["config"]["model"] == "mixerzoo"
    assert "mixerzoo_perplexity" in capsys.readouterr().out  # lm-eval's table is printed


@pytest.mark.parametrize("ckpt", ["softmax"], indirect=True)
def test_main_errors_exit_2_with_a_message(ckpt, tmp_path, capsys):
    def error(argv):
        assert mz_eval.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines and lines[-1].startswith("mixerzoo eval: error:"), lines
        return lines[-1]

    assert "no_such_task_x" in error(["--model", str(ckpt), "--tasks", "no_such_task_x", "--limit", "2"])
    missing = tmp_path / "nowhere"
    assert str(missing) in error(["--model", str(missing), "--tasks", "mixerzoo_offline"])
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()  # a save that did not finish
    assert "weight" in error(["--model", str(broken), "--tasks", "mixerzoo_choice", "--limit", "2"])
    assert "nosuchmixer" in error(["--mixer", "nosuchmixer", "--tasks", "mixerzoo_offline"])
    assert "--model PATH" in error(["--tasks", "mixerzoo_offline"])
