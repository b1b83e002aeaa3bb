"""Kernel benchmarks: log-linear attention against the anchors, in one process.

``run_kernel_bench`` times forward and forward+backward (``triton.testing.do_bench``
medians) and peak memory at a fixed number of tokens per call (B = tokens / T), for:
our Triton log-linear kernel, SDPA causal attention, fla ``chunk_log_linear_attn``,
fla ``chunk_linear_attn`` and mamba-ssm's SSD, each where importable. Results go to JSON
and a log-log PNG; ``format_bench_table`` prints them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..files import write_json_atomic
from ..ops.loglinear.state import num_levels


@dataclass(kw_only=True)
class KernelBenchConfig:
    seq_lens: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768, 65536])
    tokens: int = 65536  # per call: B = tokens // T, so every T moves the same data
    heads: int = 16
    head_dim: int = 64
    state_dim: int = 128  # mamba-ssm's N (DESIGN's anchor: N = 128, G = 1)
    dtype: str = "bfloat16"
    kernels: list[str] = field(default_factory=lambda: list(KERNELS))
    warmup_ms: int = 25
    rep_ms: int = 100
    out_dir: str = "results/bench"

    def __post_init__(self):
        unknown = set(self.kernels) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; known: {list(KERNELS)}")
        if not self.seq_lens or not self.kernels:
            raise ValueError("give at least one sequence length and one kernel")
        for t in self.seq_lens:
            if t <= 0 or self.tokens % t:
                raise ValueError(f"tokens ({self.tokens}) must be a multiple of every T; got T={t}")


def _ours(cfg: KernelBenchConfig, T: int, dt: torch.dtype, groups: int) -> Callable[[], tuple]:
    from ..ops.loglinear import log_linear_attn

    B, H, D = cfg.tokens // T, cfg.heads, cfg.head_dim

    def make():
        q = torch.randn(B, T, groups, D, device="cuda", dtype=dt)
        k = torch.randn(B, T, groups, D, device="cuda", dtype=dt) / math.sqrt(D)
        v = torch.randn(B, T, H, D, device="cuda", dtype=dt)
        g = -F.softplus(torch.randn(B, T, H, device="cuda")) * 0.1
        lam = F.softplus(torch.randn(B, T, H, num_levels(T), device="cuda", dtype=dt))
        inputs = [x.requires_grad_() for x in (q, k, v, g, lam)]
        return inputs, lambda: log_linear_attn(*inputs, scale=D ** -0.5, backend="triton")[0]

    return make


def _sdpa(cfg, T, dt):
    B, H, D = cfg.tokens // T, cfg.heads, cfg.head_dim

    def make():
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        return [q, k, v], lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return make


def _fla_loglinear(cfg, T, dt):
    from fla.ops.log_linear_attn import chunk_log_linear_attn

    B, H, D = cfg.tokens // T, cfg.heads, cfg.head_dim

    def make():
        q = torch.randn(B, T, H, D, device="cuda", dtype=dt)
        k = torch.randn(B, T, H, D, device="cuda", dtype=dt) / math.sqrt(D)
        v = torch.randn(B, T, H, D, device="cuda", dtype=dt)
        g = -F.softplus(torch.randn(B, T, H, device="cuda")) * 0.1
        lam = F.softplus(torch.randn(B, T, H, num_levels(T), device="cuda", dtype=dt))
        inputs = [x.requires_grad_() for x in (q, k, v, g, lam)]
        return inputs, lambda: chunk_log_linear_attn(*inputs)[0]

    return make


def _fla_linear(cfg, T, dt):
    from fla.ops.linear_attn import chunk_linear_attn

    B, H, D = cfg.tokens // T, cfg.heads, cfg.head_dim

    def make():
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        return [q, k, v], lambda: chunk_linear_attn(q, k, v, scale=D ** -0.5, normalize=False)[0]

    return make


def _mamba_ssd(cfg, T, dt):
    from ..ops.external import load_mamba_chunk_scan_combined

    ssd = load_mamba_chunk_scan_combined()
    B, H, P, N = cfg.tokens // T, cfg.heads, cfg.head_dim, cfg.state_dim

    def make():
        x = torch.randn(B, T, H, P, device="cuda", dtype=dt)
        dtt = F.softplus(torch.randn(B, T, H, device="cuda") - 3)
        A = -torch.rand(H, device="cuda") - 0.5
        Bm = torch.randn(B, T, 1, N, device="cuda", dtype=dt)
        Cm = torch.randn(B, T, 1, N, device="cuda", dtype=dt)
        inputs = [t.requires_grad_() for t in (x, dtt, A, Bm, Cm)]
        return inputs, lambda: ssd(*inputs, chunk_size=64)

    return make


KERNELS: dict[str, Callable] = {
    "loglinear_triton": lambda cfg, T, dt: _ours(cfg, T, dt, cfg.heads),
    "loglinear_triton_g1": lambda cfg, T, dt: _ours(cfg, T, dt, 1),
    "sdpa": _sdpa,
    "fla_loglinear": _fla_loglinear,
    "fla_linear": _fla_linear,
    "mamba2_ssd": _mamba_ssd,
}


def _time_one(make: Callable, cfg: KernelBenchConfig) -> dict[str, float]:
    from triton.testing import do_bench

    inputs, fn = make()
    out = fn()
    grad = torch.randn_like(out)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        fn().backward(grad)

    with torch.no_grad():
        fwd = do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median")
    both = do_bench(fwd_bwd, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del inputs, out, grad
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "peak_bytes": peak, "bytes_per_token": peak / cfg.tokens}


def run_kernel_bench(cfg: KernelBenchConfig, log: Callable[[str], None] = print) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("kernel benchmarks need a CUDA GPU")
    dt = getattr(torch, cfg.dtype)
    result = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
        "rows": [],
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for T in cfg.seq_lens:
        for name in cfg.kernels:
            row = {"kernel": name, "T": T, "B": cfg.tokens // T}
            try:
                row.update(_time_one(KERNELS[name](cfg, T, dt), cfg))
            except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
            result["rows"].append(row)
            log(_row_line(row))
            # rewritten after every row: a sweep cut short keeps what it measured
            write_json_atomic(out / "kernels.json", result)
    result["complete"] = True
    write_json_atomic(out / "kernels.json", result)
    plot_bench(result, out / "kernels.png")
    return result


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"T={r['T']:>6} {r['kernel']:<20} unavailable: {r['error']}"
    return (f"T={r['T']:>6} {r['kernel']:<20} fwd {r['fwd_ms']:8.3f} ms  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms"
            f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB")


def format_bench_table(result: dict, key: str = "fwd_bwd_ms") -> str:
    rows = result["rows"]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    ts = sorted({r["T"] for r in rows})
    cell = {(r["kernel"], r["T"]): r for r in rows}
    head = "| kernel | " + " | ".join(f"{t // 1024}K" for t in ts) + " |"
    lines = [head, "|---" * (len(ts) + 1) + "|"]
    for k in kernels:
        vals = []
        for t in ts:
            r = cell.get((k, t), {})
            vals.append(f"{r[key]:.2f}" if key in r else "n/a")
        lines.append(f"| {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_bench(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for k in dict.fromkeys(r["kernel"] for r in result["rows"]):
            pts = sorted((r["T"], r[key]) for r in result["rows"] if r["kernel"] == k and key in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens per call fixed)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['device']}, {result['config']['dtype']}, H={result['config']['heads']}, "
                 f"D={result['config']['head_dim']}, {result['config']['tokens']} tokens/call")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
