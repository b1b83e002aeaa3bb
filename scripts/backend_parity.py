"""Train one model twice, identical but for the log-linear backend, and compare loss curves.

    python scripts/backend_parity.py --size 125m --steps 300 --out results/backend_parity

Same seed, same initial weights, same MQAR batches; only ``backend`` of the log-linear
mixers differs ("triton" vs "torch"). Writes parity.json (both curves, max and mean
relative gap) and parity.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mixerzoo import build_model
from mixerzoo.files import write_json_atomic
from mixerzoo.tasks import build_task


def train(backend: str, args, init_state: dict | None) -> tuple[list[float], dict, float]:
    torch.manual_seed(args.seed)
    model = build_model(args.mixer, size=args.size, vocab_size=args.vocab,
                        mixer_options={"backend": backend}).cuda()
    if init_state is not None:
        model.load_state_dict(init_state)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    stream = build_task("mqar", vocab_size=args.vocab, seq_len=args.seq_len,
                        num_kv_pairs=args.kv).build(seed=args.seed, device="cuda")
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        x, y = stream.sample(args.batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    return losses, init, (time.time() - t0) / args.steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mixer", default="loglinear_adaptive")
    p.add_argument("--size", default="125m")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--kv", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/backend_parity")
    args = p.parse_args()
    curves, times = {}, {}
    curves["triton"], init, times["triton"] = train("triton", args, None)
    curves["torch"], _, times["torch"] = train("torch", args, init)
    a, b = torch.tensor(curves["triton"]), torch.tensor(curves["torch"])
    gap = ((a - b).abs() / b.abs()).tolist()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "s_per_step": times, "max_rel_gap": max(gap),
               "mean_rel_gap": sum(gap) / len(gap), "final": {k: v[-1] for k, v in curves.items()},
               "curves": curves, "device": torch.cuda.get_device_name()}
    write_json_atomic(out / "parity.json", summary)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for k, v in curves.items():
        plt.plot(v, label=f"{k} ({times[k] * 1e3:.0f} ms/step)")
    plt.xlabel("step")
    plt.ylabel("MQAR loss")
    plt.title(f"{args.mixer} {args.size}: backend parity")
    plt.legend()
    plt.savefig(out / "parity.png", dpi=110)
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))


if __name__ == "__main__":
    main()
