"""Train each zoo model beside the reference LM it reproduces, on the same batches, and compare.

    python scripts/reference_parity.py --data corpus/ --tokenizer tok/ --out results/parity \
        --size 125m --steps 200 --lrs 1e-3,3e-4 --pairs softmax,mamba2,loglinear

For every pair (zoo mixer, reference LM of mixerzoo.evals.references) and learning rate, both
models are trained from their own initialisation (the zoo's reference init against the
reference's own code) in one process: the same token batches in the same order, AdamW with
weight decay on matrices only (the same rule on both sides), the LM trainer's warmup + cosine and bf16
autocast over fp32 weights, the same loss function on the logits. Held-out loss (nats per
token) on a fixed set of validation windows is taken every ``--val-every`` steps and at the
end. Where a reference builds its MLP at another width (mamba-ssm, fla's log-linear LM), the
zoo side is built at that width, so both have the same shape.

Writes OUT/parity.json (every curve, the final held-out losses and their gaps), parity.csv,
parity.md and parity.png; each finished run is kept in OUT/runs/<pair>_lr<lr>_<side>.json,
so a rerun (after a kill, or on another machine with those files copied back) trains only
what is missing: a saved run counts while its settings, the data's content, the tokenizer and
the code's commit are unchanged. Exit status 1 when a pair's final gap exceeds
``--tolerance`` (0.03 nats) or a pair could not run (its reference does not import).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixerzoo import build_model
from mixerzoo.data import PackedSequences, tokenize_corpus
from mixerzoo.data.tokenizers import load_tokenizer, tokenizer_fingerprint
from mixerzoo.evals.references import (
    REFERENCES,
    reference_logits,
    reference_mlp_hidden,
    reference_model,
)
from mixerzoo.files import write_csv_atomic, write_json_atomic, write_text_atomic
from mixerzoo.models.build import build_config, weight_decay_groups
from mixerzoo.train.trainer import (
    autocast,
    lr_factor,
    optimizer_step,
    resolve_precision,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="text files, a folder, JSONL or Parquet (as `mixerzoo train`)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer folder / HF name")
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", default="softmax,mamba2,loglinear", help=f"zoo mixers, of {sorted(REFERENCES)}")
    p.add_argument("--lrs", default="1e-3,3e-4")
    p.add_argument("--size", default="125m")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 20 + 1")
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.03, help="largest allowed final held-out gap, nats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=None, help="token cache folder (default OUT/cache)")
    args = p.parse_args(argv)
    args.pairs = [s.strip() for s in args.pairs.split(",") if s.strip()]
    unknown = [s for s in args.pairs if s not in REFERENCES]
    if unknown:
        p.error(f"--pairs: {unknown} have no reference LM; choose from {sorted(REFERENCES)}")
    try:
        args.lrs = [float(s) for s in args.lrs.split(",") if s.strip()]
    except ValueError:
        p.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    for name in ("steps", "batch_size", "seq_len", "val_windows", "val_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 20 + 1
    return args


def next_token_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


def build_pair(name: str, args, vocab: int):
    """(zoo model, reference model), each freshly initialised from the same seed."""
    cfg = build_config(name, args.size, vocab_size=vocab)
    width = reference_mlp_hidden(name, cfg.d_model, cfg.mlp_hidden)
    torch.manual_seed(args.seed)
    zoo = build_model(name, size=args.size, vocab_size=vocab, mlp_hidden=width)
    torch.manual_seed(args.seed)
    ref = reference_model(zoo)
    return zoo, ref


@torch.no_grad()
def held_out(model, forward, val: PackedSequences, args, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for start in range(0, args.val_windows, args.batch_size):
        count = min(args.batch_size, args.val_windows - start)
        x = val.batch(start, count).to(device)
        with autocast(resolve_precision("auto", device), device):
            total += next_token_loss(forward(model, x), x).item() * count
        n += count
    model.train()
    return total / n


def train_one(model, forward, train: PackedSequences, val, args, lr: float, device) -> dict:
    model.to(device).train()
    opt = torch.optim.AdamW(weight_decay_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    # the LM trainer's schedule (its steps count from 1), floor 0.1 of the peak
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s + 1, args.warmup_steps, args.steps, min_lr_ratio=0.1))
    losses, vals = [], []
    seen = hashlib.sha256()  # of every batch, in order: both sides of a pair must see the same
    t0 = time.time()
    for step in range(args.steps):
        x = train.batch(step * args.batch_size, args.batch_size)
        seen.update(x.numpy().tobytes())
        x = x.to(device)
        with autocast(resolve_precision("auto", device), device):
            loss = next_token_loss(forward(model, x), x)
        loss.backward()
        optimizer_step(model.parameters(), opt, args.grad_clip)
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            vals.append({"step": step + 1, "val_loss": held_out(model, forward, val, args, device)})
    seconds = time.time() - t0
    return {"train_loss": losses, "val": vals, "final_val_loss": vals[-1]["val_loss"] if vals else float("nan"),
            "steps": len(losses), "finished": len(losses) == args.steps and math.isfinite(losses[-1]),
            "params": sum(p.numel() for p in model.parameters()), "seconds": seconds,
            "batches_sha256": seen.hexdigest()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["pair"], r["lr"]) for r in results})
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
    for ax, (pair, lr) in zip(axes[0], cells):
        for r in results:
            if (r["pair"], r["lr"]) == (pair, lr):
                style = "-" if r["side"] == "zoo" else "--"
                ax.plot([v["step"] for v in r["val"]], [v["val_loss"] for v in r["val"]], style, marker="o",
                        label=f"{r['side']}: {r['model']}")
        ax.set_title(f"{pair}, lr {lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    corpus = tokenize_corpus(args.data, tokenizer, args.cache or out / "cache", progress=False)
    train = PackedSequences(corpus, args.seq_len, split="train", val_fraction=0.02, seed=args.seed)
    val = PackedSequences(corpus, args.seq_len, split="val", val_fraction=0.02, seed=args.seed)
    if len(val) < args.val_windows:
        print(f"note: the validation split has {len(val)} windows; using all of them", file=sys.stderr)
        args.val_windows = len(val)
    vocab = len(tokenizer)
    # what a saved run depends on, besides its pair, rate and side (in its file name): a saved
    # run is kept only while all of it is unchanged (the code's commit included)
    setting = {k: v for k, v in vars(args).items()
               if k not in ("out", "cache", "device", "tolerance", "pairs", "lrs", "data", "tokenizer")}
    setting.update(data=corpus.fingerprint, tokenizer=tokenizer_fingerprint(tokenizer), commit=_commit())
    results, skipped = [], []
    for name in args.pairs:
        for lr in args.lrs:
            for side in ("zoo", "reference"):
                path = out / "runs" / f"{name}_lr{lr:g}_{side}.json"
                if path.is_file():
                    saved = json.loads(path.read_text())
                    if saved.get("setting") == setting:
                        print(f"== {name} lr {lr:g} {side}: finished earlier")
                        results.append(saved)
                        continue
                try:
                    zoo, ref = build_pair(name, args, vocab)
                except ImportError as e:
                    print(f"== {name}: the reference is not importable here ({e}); skipped")
                    skipped.append(name)
                    break
                model = zoo if side == "zoo" else ref
                forward = (lambda m, x: m(input_ids=x).logits) if side == "zoo" else reference_logits
                label = f"mixerzoo {name}" if side == "zoo" else REFERENCES[name]
                print(f"== {name} lr {lr:g} {side} ({label}, {sum(p.numel() for p in model.parameters()):,} params)")
                record = {"pair": name, "lr": lr, "side": side, "model": label, "setting": setting,
                          **train_one(model, forward, train, val, args, lr, device)}
                write_json_atomic(path, record)
                results.append(record)
                del zoo, ref, model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    rows, failed = [], []
    for name in args.pairs:
        for lr in args.lrs:
            got = {r["side"]: r for r in results if r["pair"] == name and r["lr"] == lr}
            if set(got) != {"zoo", "reference"}:
                if name not in skipped:
                    skipped.append(name)
                continue
            gap = got["zoo"]["final_val_loss"] - got["reference"]["final_val_loss"]
            ok = got["zoo"]["finished"] and got["reference"]["finished"] and abs(gap) <= args.tolerance
            rows.append({"pair": name, "reference": REFERENCES[name], "lr": lr,
                         "zoo_val_loss": got["zoo"]["final_val_loss"],
                         "reference_val_loss": got["reference"]["final_val_loss"], "gap": gap,
                         "zoo_params": got["zoo"]["params"], "reference_params": got["reference"]["params"],
                         "within_tolerance": ok})
            if not ok:
                failed.append(f"{name} lr {lr:g}")
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "tolerance": args.tolerance}
    write_json_atomic(out / "parity.json", {"meta": meta, "rows": rows, "runs": results})
    if rows:
        write_csv_atomic(out / "parity.csv", list(rows[0]), rows)
    lines = ["| zoo | reference | lr | zoo held-out | reference held-out | gap | params (zoo / ref) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['pair']}` | {r['reference']} | {r['lr']:g} | {r['zoo_val_loss']:.4f} | "
              f"{r['reference_val_loss']:.4f} | {r['gap']:+.4f} | {r['zoo_params']:,} / {r['reference_params']:,} |"
              for r in rows]
    write_text_atomic(out / "parity.md", "\n".join(lines) + "\n")
    if results:
        plot(results, out / "parity.png")
    print("\n".join(lines))
    if failed:
        print(f"gap above {args.tolerance} nats (or a run unfinished): {', '.join(failed)}")
    if skipped:
        print(f"not compared (the reference did not run here): {', '.join(skipped)}")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
