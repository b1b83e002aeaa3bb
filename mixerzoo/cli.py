"""The ``mixerzoo`` command: list, params, synth, train, eval, tokenizer, bench, demo.

Thin by design: parse → call the library → print / write files. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import get_mixer_spec, list_mixers

    rows = []
    for name in list_mixers():
        spec = get_mixer_spec(name)
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        rows.append([name, spec.class_path, opts or "-", spec.summary])
    print(_table(rows, ["mixer", "class", "options", "summary"]))
    return 0


def _mixer_list(value: str) -> list[str]:
    from .registry import list_mixers

    return list_mixers() if value == "all" else [m.strip() for m in value.split(",") if m.strip()]


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _check_json_path(path: str) -> None:
    """Refuse a --json path that could not be written, before the table is computed."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path!r} is a folder; give a file path such as {str(target / 'params.json')!r}")
    if not target.parent.is_dir():
        raise ValueError(f"--json {path!r}: the folder {str(target.parent)!r} does not exist")


def cmd_params(args: argparse.Namespace) -> int:
    from .models.build import param_rows, param_target

    if args.json:
        _check_json_path(args.json)
    kwargs = {"vocab_size": args.vocab_size}
    rows = param_rows(args.size, _mixer_list(args.mixers), **kwargs)
    target = param_target(args.size)
    print(f"size {args.size}: non-embedding target {target:,} (softmax, SwiGLU 8/3·d)")
    print(_table(
        [[r["mixer"], f"{r['params']:,}", f"{100 * r['deviation']:+.2f}%", r["mlp_hidden"],
          _count(r["state_2k"]), _count(r["state_16k"])] for r in rows],
        ["mixer", "non-emb params", "deviation", "mlp width", "state @2K", "state @16K"],
    ))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "target": target, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    worst = max(abs(r["deviation"]) for r in rows)
    return 0 if worst <= 0.01 else 1


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    # argparse names the flag in its message ("argument --seeds: ...") and exits with 2.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _task_choices() -> list[str]:
    from .tasks import list_tasks

    return list_tasks()


def _time_limit(args: argparse.Namespace) -> dict:
    """The --time-limit override: nothing when absent, no cap for 0."""
    if args.time_limit is None:
        return {}
    return {"time_limit_s": args.time_limit or None}


def cmd_synth(args: argparse.Namespace) -> int:
    from .evals.synthetic import format_table, run_synthetic
    from .evals.synthetic.experiments import (build_experiment, describe_presets, load_preset,
                                              parse_sets, read_experiment)
    from .files import check_out_dir

    if args.list_presets:
        print(describe_presets())
        return 0
    if args.out is not None:
        # before the sweep: a bad --out would otherwise only fail once every run had trained
        check_out_dir(args.out, what="--out")
    layers = [load_preset(args.preset)] + [read_experiment(f) for f in args.config] + [parse_sets(args.set)]
    overrides = {k: v for k, v in {
        "mixers": tuple(_mixer_list(args.mixers)) if args.mixers else None,
        "device": args.device,
        "out_dir": args.out,
        "max_steps": args.steps,
        "seeds": tuple(range(args.seeds)) if args.seeds is not None else None,
        "workers": args.workers,
    }.items() if v is not None}
    config = build_experiment(*layers, task=args.task, **overrides, **_time_limit(args))
    results = run_synthetic(config)
    print(format_table(results))
    resumed = sum(bool(r.get("resumed")) for r in results["runs"])
    if resumed:
        print(f"\n{resumed} of {len(results['runs'])} runs were finished earlier in {args.out} and kept")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.lm:
        return _demo_lm(args)
    from .evals.synthetic import format_table, preset, run_synthetic

    config = preset("demo", task="mqar", out_dir=args.out, device=args.device, **_time_limit(args))
    results = run_synthetic(config)
    print(format_table(results))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train
    from .train.cli_args import config_from_args

    cfg, resume = config_from_args(args)
    summary = train(cfg, resume=resume)
    if summary.get("checkpoint"):
        val = summary.get("val") or {}
        tail = f", val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits/byte" if val else ""
        print(f"trained {summary['step']} steps ({summary['tokens']:,} tokens){tail}")
        print(f"checkpoint: {summary['checkpoint']}  (mixerzoo eval --model {cfg.out} --tasks mixerzoo_offline)")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .data.tokenizers import train_bpe

    tok = train_bpe(args.data, args.vocab, args.out, text_field=args.text_field)
    print(f"trained a byte-level BPE of {len(tok):,} tokens; wrote {args.out} (use --tokenizer {args.out})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .files import check_out_dir, write_json_atomic
    from .train.metrics import compare_runs, plot_runs, read_metrics

    check_out_dir(args.out, what="--out")
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        path = Path(path if sep else label)
        label = label if sep else path.name
        metrics = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics.is_file():
            raise FileNotFoundError(f"{spec!r}: no {metrics} (give a `mixerzoo train --out` folder or its "
                                    f"metrics.jsonl, optionally as LABEL=PATH)")
        if label in runs:
            raise ValueError(f"two runs are labelled {label!r}: give LABEL=PATH for each")
        runs[label] = read_metrics(metrics)
    summary = compare_runs(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", summary)
    plot_runs(runs, out / "compare.png", title=args.title)
    for label, row in summary["runs"].items():
        gap = f"  gap to {summary['reference']}: max {row['max_rel_gap']:.2%}, mean {row['mean_rel_gap']:.3%}" \
            if "max_rel_gap" in row else "  (reference)"
        val = f", val {row['final_val_loss']:.4f}" if row["final_val_loss"] is not None else ""
        print(f"{label:>16}: {row['steps']} steps, final loss {row['final_loss']:.4f}{val}{gap}")
    print(f"wrote {out}/compare.json and compare.png")
    return 0


def _demo_lm(args: argparse.Namespace) -> int:
    """A tiny LM on a generated corpus for about a minute on the CPU, then the bundled
    lm-eval tasks on its checkpoint."""
    import shutil

    from .evals.lm_eval import evaluate, format_results
    from .data.toy_text import write_corpus
    from .train import TrainConfig, train

    out = Path(args.out if args.out != "results/demo" else "results/demo_lm")
    corpus = write_corpus(out / "corpus.jsonl", n_docs=3000)
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo always starts afresh
    cfg = TrainConfig(mixer=args.mixer, size="tiny", data=str(corpus), data_cache=str(out / "cache"),
                      out=str(run), device=args.device, seq_len=128, batch_size=16, steps=args.steps,
                      lr=3e-3, warmup_steps=30, val_fraction=0.05, val_every=max(args.steps // 2, 1),
                      save_every=args.steps, log_every=25)
    summary = train(cfg)
    print(f"\nvalidation: loss {summary['val']['val_loss']:.4f} nats/token, "
          f"{summary['val']['val_bpb']:.4f} bits/byte; loss curve {run / 'loss.png'}\n")
    results = evaluate(str(run), ["mixerzoo_offline"], device=args.device, batch_size=8, limit=args.eval_limit)
    print(format_results(results))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "models":
        return _bench_models(args)
    from .bench import KernelBenchConfig, format_bench_table, run_kernel_bench

    kwargs = {"out_dir": args.out or "results/bench", "dtype": args.dtype}
    if args.seq_lens:
        kwargs["seq_lens"] = [int(t) for t in args.seq_lens.split(",")]
    if args.kernels:
        kwargs["kernels"] = [k.strip() for k in args.kernels.split(",")]
    if args.tokens:
        kwargs["tokens"] = args.tokens
    result = run_kernel_bench(KernelBenchConfig(**kwargs))
    for key in ("fwd_ms", "fwd_bwd_ms"):
        print(f"\n{key} (median, {result['device']}):")
        print(format_bench_table(result, key))
    print(f"\nwrote {kwargs['out_dir']}/kernels.json and {kwargs['out_dir']}/kernels.png")
    return 0


def _bench_models(args: argparse.Namespace) -> int:
    from .bench.models import ModelBenchConfig, format_model_table, format_profile, run_model_bench

    def ints(text):
        return [int(t) for t in text.split(",")]

    kwargs = {"out_dir": args.out or "results/bench_models", "size": args.size, "mixers": _mixer_list(args.mixers),
              "precision": args.precision, "warmup": args.warmup, "steps": args.steps, "profile": args.profile,
              "checkpoint_activations": args.checkpoint_activations, "compile": args.compile,
              "fused": not args.no_fused, "device": args.device,
              "anchors": [a.strip() for a in args.anchors.split(",") if a.strip()] if args.anchors != "none" else []}
    kwargs["seq_lens"] = ints(args.seq_lens or "2048,8192,16384")
    kwargs["tokens"] = args.tokens or 32768
    result = run_model_bench(ModelBenchConfig(**kwargs))
    print(f"\ntraining step, {result['device']}, {args.size}, {args.precision}, {kwargs['tokens']} tokens/step:")
    print(format_model_table(result))
    for row in result["rows"]:
        if "profile" in row:
            print("\n" + format_profile(row))
    print(f"\nwrote {kwargs['out_dir']}/models.json, models.md and models.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixerzoo", description="A zoo of sequence mixers behind one model API.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="the registry of mixers")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("params", help="parameter table of every mixer at a size")
    s.add_argument("--size", default="125m")
    s.add_argument("--mixers", default="all", help="comma-separated names, or 'all'")
    s.add_argument("--vocab-size", type=_positive_int, default=None)
    s.add_argument("--json", default=None, help="also write the table as JSON here")
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("synth", help="train and evaluate mixers on a synthetic recall task",
                       description="A sweep from a preset, YAML experiment files (--config) and KEY=VALUE "
                                   "overrides (--set), in that order; see --list-presets.")
    s.add_argument("task", nargs="?", default=None, choices=_task_choices(),
                   help="the task (default: the preset's or config's, else mqar)")
    s.add_argument("--preset", default="quick", help="a built-in sweep or a shipped experiment (--list-presets)")
    s.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="experiment file(s): keys as --set; later files win")
    s.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="e.g. --set seq_len=128 num_kv_pairs=32 d_model=128 steps=20000; values are YAML")
    s.add_argument("--list-presets", action="store_true", help="print the presets with their expected run times")
    s.add_argument("--mixers", default=None, help="comma-separated names, or 'all' (default: the preset's)")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    s.add_argument("--out", default=None, help="results folder (JSON, CSV, PNG); finished runs there are kept")
    s.add_argument("--steps", type=_positive_int, default=None, help="training steps per run (>= 1)")
    s.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds (>= 1)")
    s.add_argument("--workers", type=_positive_int, default=None,
                   help="runs at a time in their own processes, spread over the visible GPUs")
    s.add_argument("--time-limit", type=_seconds, default=None, metavar="SECONDS",
                   help="per-run training time cap (0: none; default: the preset's)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("train", help="train a language model on text (torchrun for several GPUs)")
    from .train.cli_args import add_train_arguments

    add_train_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="lm-evaluation-harness on a checkpoint (every lm-eval flag passes through)",
                       add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)

    s = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on your own text (offline)")
    s.add_argument("what", choices=["train"])
    s.add_argument("--data", required=True, help="text file or folder, .jsonl, .parquet, or hf:NAME[:CONFIG]")
    s.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    s.add_argument("--out", required=True, help="folder for the tokenizer files")
    s.add_argument("--text-field", default="text", help="JSONL / Parquet field holding the text")
    s.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("compare", help="loss curves of several training runs on one plot, with their gaps")
    s.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="run folders (or metrics.jsonl files); "
                   "the first is the reference")
    s.add_argument("--out", default="results/compare", help="folder for compare.json and compare.png")
    s.add_argument("--title", default=None, help="plot title")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("bench", help="speed and memory vs sequence length (needs a GPU): kernels, or "
                                     "whole models' training steps")
    s.add_argument("what", choices=["kernels", "models"])
    s.add_argument("--seq-lens", default=None, help="comma-separated T values (kernels: 2K..64K; models: 2K,8K,16K)")
    s.add_argument("--kernels", default=None, help="kernels: comma-separated subset of the kernels")
    s.add_argument("--tokens", type=int, default=None, help="tokens per call / step (kernels 65536, models 32768)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="kernels only")
    s.add_argument("--size", default="350m", help="models: size preset")
    s.add_argument("--mixers", default="all", help="models: comma-separated names, or 'all'")
    s.add_argument("--anchors", default="fla_log_linear_mamba2,fla_mamba2",
                   help="models: fla LMs to time beside ours where fla imports, or 'none'")
    s.add_argument("--precision", default="bf16", choices=["bf16", "bf16-true", "fp32"],
                   help="models: as `mixerzoo train --precision`")
    s.add_argument("--steps", type=int, default=8, help="models: timed steps per row (median reported)")
    s.add_argument("--warmup", type=int, default=3, help="models: untimed steps first")
    s.add_argument("--profile", action="store_true",
                   help="models: a torch profiler trace per row and GPU time by kernel kind per layer")
    s.add_argument("--checkpoint-activations", action="store_true", help="models: recompute blocks in backward")
    s.add_argument("--compile", action="store_true", help="models: torch.compile each block")
    s.add_argument("--no-fused", action="store_true",
                   help="models: the plain torch ops instead of the fused ones (the 'before' figures)")
    s.add_argument("--device", default=None, help="models: cuda (default) or cpu for a smoke run")
    s.add_argument("--out", default=None, help="results folder (kernels: results/bench; models: results/bench_models)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="all six mixers on MQAR at a matched tiny size (CPU, minutes); "
                                    "--lm: a tiny LM trained and run through lm-eval")
    s.add_argument("--out", default="results/demo", help="results folder (--lm: results/demo_lm)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--lm", action="store_true",
                   help="train a tiny LM on a generated corpus (about a minute on a CPU), then evaluate it "
                        "with the bundled lm-eval tasks")
    s.add_argument("--mixer", default="loglinear_adaptive", help="--lm: the mixer to train")
    s.add_argument("--steps", type=int, default=600, help="--lm: training steps")
    s.add_argument("--eval-limit", type=int, default=None, help="--lm: examples per lm-eval task (default all)")
    s.add_argument("--time-limit", type=_seconds, default=None, metavar="SECONDS",
                   help="per-run training time cap (0: none; default 30, which keeps the demo "
                        "near five minutes on two idle cores)")
    s.set_defaults(func=cmd_demo)
    return p


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """argparse's "unrecognized arguments" with the closest option of the subcommand for each."""
    from .hints import unknown_names

    sub = next((a.choices.get(getattr(args, "command", None)) for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)), None) or parser
    known = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    flags = [e.split("=", 1)[0] for e in extra if e.startswith("--")]
    others = [e for e in extra if not e.startswith("--")]
    text = unknown_names(flags, known) if flags else ""
    if others:
        text = ", ".join(t for t in (text, " ".join(others)) if t)
    sub.error(f"unrecognized arguments: {text}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        # lm-eval parses its own flags; ours are translated there (mixerzoo.evals.lm_eval).
        from .evals.lm_eval import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args, extra)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"mixerzoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
