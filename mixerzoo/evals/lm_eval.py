"""lm-evaluation-harness integration: the ``mixerzoo`` lm-eval model, ``mixerzoo eval`` and
:func:`evaluate`.

>>> results = evaluate("runs/a", ["mixerzoo_offline"], limit=50)     # doctest: +SKIP
>>> print(format_results(results))                                  # doctest: +SKIP

Importing this module registers :class:`MixerZooLM` in lm-eval's model registry as
``mixerzoo``. The bundled offline tasks (``mixerzoo_offline`` and its members, see
:mod:`mixerzoo.evals.lm_tasks`) are always found; other names are lm-eval's stock tasks,
which download their data from the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # lm-eval's HFLM also needs accelerate (lm-eval's own "hf" extra)
    raise ImportError(f"lm-eval integration needs lm-eval and accelerate: pip install 'mixerzoo[eval]' ({e})") from e

from ..models.io import CheckpointError, load_model, resolve_checkpoint
from ..registry import RegistryError
from ..data.tokenizers import BYTE_VOCAB, TokenizerError, load_tokenizer
from .lm_tasks import BUNDLED, TASKS_DIR

# Our mixers have no position table, so no natural maximum; 2048 is lm-eval's usual window
# and keeps rolling-perplexity windows and generation prompts bounded. Override: max_length=.
DEFAULT_MAX_LENGTH = 2048
FIRST_CHUNK = 16  # tokens generated before the first check for a stop string


class EvalError(ValueError):
    """An evaluation request that cannot run as given; the message says what to change."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_model("mixerzoo")
class MixerZooLM(HFLM):
    """lm-eval's ``HFLM`` for mixerzoo models, from ``pretrained=<checkpoint or run folder>``
    (its tokenizer from the same folder), ``mixer=<name>,size=<size>`` (random weights and the
    byte tokenizer: smoke tests), or a ``MixerZooForCausalLM`` object.

    Scoring is HFLM's own: it right-pads a batch and calls ``model(input_ids)`` without a mask,
    which is exact for causal mixers (a position never sees the padding after it). Generation
    goes through the model's recurrent ``generate``, one prompt at a time (see
    :meth:`_model_generate`).
    """

    def __init__(self, pretrained=None, mixer: str | None = None, size: str = "tiny", tokenizer=None,
                 max_length: int = DEFAULT_MAX_LENGTH, softmax_dtype="float32", **kwargs: Any):
        from transformers import PreTrainedModel

        if (pretrained is None) == (mixer is None):
            raise EvalError("mixerzoo model: give pretrained=<checkpoint or run folder> or mixer=<name>,size=<size>")
        _check_model_args(kwargs)
        # log-probs in fp32 even for bf16 weights: sums over long continuations lose digits
        common = dict(backend="causal", max_length=max_length, softmax_dtype=softmax_dtype)
        if isinstance(pretrained, PreTrainedModel):
            if kwargs.get("device"):  # HFLM keeps a model object where it is
                pretrained.to(kwargs["device"])
            super().__init__(pretrained=pretrained, tokenizer=_tokenizer_for(pretrained, tokenizer), **common, **kwargs)
            return
        if pretrained is not None:
            path = resolve_checkpoint(pretrained).resolve()
            tok = load_tokenizer(str(tokenizer or path))
            self._loaded, name = load_model(path), str(path)
        else:
            from .. import build_model

            tok = load_tokenizer(tokenizer)  # None: the byte tokenizer
            self._loaded, name = build_model(mixer, size, vocab_size=len(tok)), f"mixerzoo-{mixer}-{size}-random"
        if self._loaded.config.vocab_size < len(tok):
            raise EvalError(f"tokenizer has {len(tok)} tokens but the model only {self._loaded.config.vocab_size}")
        super().__init__(pretrained=name, tokenizer=tok, **common, **kwargs)

    # HFLM calls these two with a model name; ours is already built in __init__.
    def _get_config(self, pretrained: str, **_: Any) -> None:
        self._config = self._loaded.config

    def _create_model(self, pretrained: str, dtype="auto", **_: Any) -> None:
        from lm_eval.models.utils_hf import get_dtype

        self._model = self._loaded if dtype in (None, "auto") else self._loaded.to(get_dtype(dtype))

    def get_model_info(self) -> dict:
        # HFLM would ask the HF hub for the revision of a model name; a local folder has none.
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "model_revision": None, "model_sha": ""}

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **gen: Any) -> torch.Tensor:
        """``context [B, W]`` (left-padded prompts) -> ``[B, W + n]``, as HFLM expects.

        Recurrent state cannot skip pad tokens, so each prompt is stripped of its padding and
        generated alone; after the new tokens, rows are filled with EOS, which decoding drops.
        """
        mask = gen.pop("attention_mask", None)
        sampling = _sampling_args(gen)
        width, budget = context.shape[1], max_length - context.shape[1]
        rows = []
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            for i in range(context.shape[0]):
                prompt = context[i:i + 1] if mask is None else context[i:i + 1, mask[i].bool()]
                rows.append(self._generate_one(prompt, budget, stop, sampling))
        out = context.new_full((context.shape[0], width + max((len(r) for r in rows), default=0)), self.eot_token_id)
        out[:, :width] = context
        for i, r in enumerate(rows):
            out[i, width:width + len(r)] = r
        return out

    def _generate_one(self, prompt: torch.Tensor, budget: int, stop: list[str], sampling: dict) -> torch.Tensor:
        """Up to ``budget`` new tokens [n] for one prompt [1, T].

        The model's ``generate`` has no stop-string hook, so it runs in chunks of doubling
        length (16, 32, ...), each one continuing from the tokens so far (one parallel prefill,
        then recurrent steps) until a chunk holds EOS or a stop string: at most about twice
        the steps needed, instead of always ``budget`` steps. lm-eval cuts the text at the stop.
        """
        seq, chunk, t0 = prompt, FIRST_CHUNK, prompt.shape[1]
        while seq.shape[1] - t0 < budget:
            seq = self.model.generate(seq, max_new_tokens=min(chunk, budget - (seq.shape[1] - t0)),
                                      eos_token_id=self.eot_token_id, **sampling)
            new = seq[0, t0:]
            if new[-1].item() == self.eot_token_id or any(s and s in self.tok_decode(new.tolist()) for s in stop):
                break
            chunk *= 2
        return seq[0, t0:]


# HFLM options that load or place the model in ways ours does not (we build it ourselves).
_UNSUPPORTED = ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file")


def _check_model_args(kwargs: dict) -> None:
    """Refuse model_args that HFLM would otherwise pass on and our loading would ignore."""
    known = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs", "backend"}
    bad = sorted(k for k in kwargs if k not in known or (k in _UNSUPPORTED and kwargs[k]))
    if bad:
        raise EvalError(f"mixerzoo model: unsupported model_args {bad}; use pretrained or mixer/size, "
                        "tokenizer, max_length, dtype, batch_size, device and HFLM's scoring options")


def _sampling_args(gen: dict) -> dict:
    """lm-eval's generation kwargs -> our ``generate``'s; anything else is refused, not dropped."""
    gen = dict(gen)
    temperature = float(gen.pop("temperature", 0.0) or 0.0)
    do_sample = bool(gen.pop("do_sample", False)) and temperature > 0  # lm-eval: temperature 0 = greedy
    top_k, top_p = gen.pop("top_k", None), gen.pop("top_p", None)
    if gen:
        raise EvalError(f"generation arguments not supported by mixerzoo models: {sorted(gen)} "
                        "(supported: until, max_gen_toks, do_sample, temperature, top_k, top_p)")
    if not do_sample:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}


def _tokenizer_for(model, tokenizer):
    """The tokenizer for a model object: the one given, the one saved beside it, or the byte
    tokenizer for a 257-token model."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    folder = getattr(model, "name_or_path", "")  # the folder it was loaded from, if any
    if tokenizer is None and not (folder and (Path(folder) / "tokenizer_config.json").is_file()):
        if model.config.vocab_size != BYTE_VOCAB:
            raise EvalError(f"model has {model.config.vocab_size} tokens: pass its tokenizer (tokenizer=...)")
        return load_tokenizer(None)
    return load_tokenizer(tokenizer or str(folder))


# --- Python API ----------------------------------------------------------------------------
def _task_list(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else [t for x in tasks for t in x.split(",")]
    names = [t.strip() for t in names if t.strip()]
    if not names:
        raise EvalError("no tasks given; the bundled offline suite is 'mixerzoo_offline'")
    return names


def task_manager(tasks: list[str], include_path=None):
    """A ``TaskManager`` with the bundled tasks (and ``include_path``). lm-eval's index of its
    ~15k stock tasks takes seconds, so it is built only when a task is not bundled."""
    from lm_eval.tasks import TaskManager

    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)],
                       include_defaults=any(t not in BUNDLED for t in tasks))


def evaluate(model_or_path, tasks: str | list[str], *, limit: int | float | None = None, batch_size: int | str = 1,
             device: str | None = None, include_path=None, model_args: dict | None = None, **kw: Any) -> dict:
    """lm-eval's ``simple_evaluate`` on a mixerzoo model; returns its results dict.

    ``model_or_path``: a checkpoint or run folder, a ``MixerZooForCausalLM``, or any lm-eval
    ``LM`` (e.g. ``MixerZooLM(mixer="softmax")``). ``model_args`` go to :class:`MixerZooLM`
    (``tokenizer``, ``max_length``, ``dtype``), ``kw`` to ``simple_evaluate`` (``num_fewshot``,
    ``gen_kwargs``, ``bootstrap_iters``, ``log_samples`` (default False), ...).
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM

    names = _task_list(tasks)
    manager = task_manager(names, include_path)
    missing = [t for t in names if not t.endswith(".yaml") and not manager.match_tasks([t])]
    if missing:
        raise EvalError(f"unknown lm-eval task(s): {', '.join(missing)} (bundled: {', '.join(BUNDLED)})")
    device = device or default_device()
    lm = model_or_path if isinstance(model_or_path, LM) else MixerZooLM(
        pretrained=model_or_path, batch_size=batch_size, device=device, **(model_args or {}))
    kw.setdefault("log_samples", False)
    return simple_evaluate(model=lm, tasks=names, limit=limit, batch_size=batch_size, device=device,
                           task_manager=manager, **kw)


def format_results(results: dict) -> str:
    """lm-eval's result tables (tasks, then groups when there are any) as Markdown."""
    from lm_eval.utils import make_table

    tables = [make_table(results)] + ([make_table(results, "groups")] if results.get("groups") else [])
    return "\n".join(tables)


# --- mixerzoo eval -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix such as --mod must not swallow lm-eval's own flags.
    p = argparse.ArgumentParser(prog="mixerzoo eval", add_help=False, allow_abbrev=False,
                                description="lm-evaluation-harness on a mixerzoo model; every flag not "
                                            "listed here is lm-eval's (`lm-eval run --help`) and passes through.")
    p.add_argument("--model", metavar="PATH", help="a checkpoint folder, or a training run folder (its latest)")
    p.add_argument("--mixer", help="evaluate a randomly initialised model of this mixer instead (smoke tests)")
    p.add_argument("--size", default=None, help="with --mixer: the size preset (default tiny)")
    p.add_argument("--tasks", "-t", nargs="+", default=[], help=f"comma list; bundled offline: {', '.join(BUNDLED)}")
    p.add_argument("--include_path", help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("-h", "--help", action="store_true")
    return p


def _lm_eval_argv(ours: argparse.Namespace, rest: list[str]) -> list[str]:
    """Our flags -> lm-eval's ``run`` flags; ``rest`` follows unchanged."""
    if (ours.model is None) == (ours.mixer is None):
        raise EvalError("give --model PATH (a checkpoint or training run folder) or --mixer NAME [--size SIZE]")
    if any(a.startswith("-M") for a in rest):
        raise EvalError("-M is lm-eval's model-type flag; mixerzoo eval always runs the 'mixerzoo' model: "
                        "use --model PATH")
    if ours.model is not None:
        if ours.size is not None:
            raise EvalError("--size goes with --mixer; a checkpoint has its own size")
        model_args = {"pretrained": str(resolve_checkpoint(ours.model).resolve())}
    else:
        from .. import build_config

        size = ours.size or "tiny"
        try:  # cheap (no weights): a bad name fails here, not after lm-eval's task index
            build_config(ours.mixer, size, vocab_size=BYTE_VOCAB)
        except ValueError as e:
            raise EvalError(str(e)) from e
        model_args = {"mixer": ours.mixer, "size": size}
    tasks = _task_list(ours.tasks)
    if ours.include_path and any(t in BUNDLED for t in tasks):
        # lm-eval's CLI takes one --include_path, and the bundled tasks need theirs.
        raise EvalError(f"--include_path cannot be combined with the bundled tasks ({', '.join(BUNDLED)}); "
                        f"copy the YAML files of {TASKS_DIR} into your folder, they work from anywhere")
    # JSON, so that a path holding commas or '=' reaches lm-eval intact
    return ["run", "--model", "mixerzoo", "--model_args", json.dumps(model_args), "--tasks", ",".join(tasks),
            "--include_path", ours.include_path or str(TASKS_DIR), "--device", ours.device or default_device(), *rest]


def _fail(message) -> int:
    print(f"mixerzoo eval: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """``mixerzoo eval ...``: lm-eval's own CLI (in this process, our model registered) with
    ``--model PATH`` / ``--mixer NAME`` translated and all other flags passed through."""
    from lm_eval.__main__ import cli_evaluate

    ours, rest = _parser().parse_known_args(argv)
    if ours.help:
        print(_parser().format_help())
        argv_lm = ["run", "--help"]
    else:
        try:
            argv_lm = _lm_eval_argv(ours, rest)
        except (EvalError, CheckpointError) as e:
            return _fail(e)
    saved, sys.argv = sys.argv, ["lm-eval", *argv_lm]
    try:
        cli_evaluate()
    except SystemExit as e:  # lm-eval's argparse: --help, or a bad flag (its message is printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except (EvalError, CheckpointError, TokenizerError, RegistryError) as e:
        return _fail(e)
    except ValueError as e:
        if str(e).startswith("Tasks not found"):  # lm-eval's message for names it cannot resolve
            return _fail(f"unknown lm-eval task(s): {str(e).split(':', 1)[1].strip()} "
                         f"(bundled: {', '.join(BUNDLED)}; stock tasks: `lm-eval ls tasks`)")
        raise
    finally:
        sys.argv = saved
    return 0
