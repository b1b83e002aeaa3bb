"""Model benchmarks: training tokens/s, step time and peak memory of whole LMs.

Every row is one optimizer step of ``mixerzoo train``'s own code (``prepare_model``,
``build_optimizer``, ``forward_backward`` with the chunked loss, ``optimizer_step``, the same
precision and autocast), at a fixed number of tokens per step (B = tokens / T), for each
requested mixer and sequence length, plus fla's LMs as anchors where fla imports, all in one
process. ``--profile`` adds a torch profiler trace per row and a breakdown of GPU time by
kind of kernel, per layer. Results go to ``models.json`` (rewritten after every row),
``models.png`` and a Markdown table.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..files import write_json_atomic

ANCHORS = ("fla_log_linear_mamba2", "fla_mamba2")


@dataclass(kw_only=True)
class ModelBenchConfig:
    size: str = "350m"
    mixers: list[str] = field(default_factory=lambda: ["all"])
    seq_lens: list[int] = field(default_factory=lambda: [2048, 8192, 16384])
    tokens: int = 32768  # per optimizer step: B = tokens // T
    vocab_size: int = 32000
    precision: str = "bf16"  # the trainer's: bf16 (autocast, fp32 weights), bf16-true, fp32
    anchors: list[str] = field(default_factory=lambda: list(ANCHORS))
    warmup: int = 3
    steps: int = 8  # timed steps; the row reports their median
    checkpoint_activations: bool = False
    compile: bool = False
    fused: bool = True  # False: the plain torch ops the fused ones replace ("before")
    profile: bool = False
    device: str | None = None  # None: cuda
    out_dir: str = "results/bench_models"

    def __post_init__(self):
        from ..registry import list_mixers
        from ..train.config import PRECISIONS

        known = list_mixers()
        if self.mixers in (["all"], "all"):
            self.mixers = list(known)
        unknown = [m for m in self.mixers if m not in known]
        if unknown:
            raise ValueError(f"unknown mixers {unknown}; known: {', '.join(known)} (or 'all')")
        bad = [a for a in self.anchors if a not in ANCHORS]
        if bad:
            raise ValueError(f"unknown anchors {bad}; known: {', '.join(ANCHORS)}")
        if self.precision not in PRECISIONS or self.precision == "auto":
            raise ValueError(f"precision must be one of bf16, bf16-true, fp32; got {self.precision!r}")
        if not self.seq_lens:
            raise ValueError("give at least one sequence length")
        for t in self.seq_lens:
            if t < 2 or self.tokens % t:
                raise ValueError(f"tokens per step ({self.tokens}) must be a multiple of every T >= 2; got T={t}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("steps must be >= 1 and warmup >= 0")


# --- what a row runs ---------------------------------------------------------------------------

def _train_config(cfg: ModelBenchConfig, mixer: str):
    from ..train.config import TrainConfig

    return TrainConfig(mixer=mixer, size=cfg.size, precision=cfg.precision, compile=cfg.compile,
                       checkpoint_activations=cfg.checkpoint_activations)


def _ours(cfg: ModelBenchConfig, mixer: str, device: torch.device):
    """(model, step function, parameter count, layers) for a mixerzoo LM, built as the trainer does."""
    from .. import build_model
    from ..train.trainer import autocast, build_optimizer, forward_backward, optimizer_step, prepare_model

    tcfg = _train_config(cfg, mixer)
    with torch.device(device):  # initialised where it runs: seconds less per row at 350m
        model = build_model(mixer, cfg.size, vocab_size=cfg.vocab_size, kernels="fused" if cfg.fused else "reference")
    model = prepare_model(model, tcfg, cfg.precision, device)
    model.train()
    optimizer = build_optimizer(model, tcfg, device)

    def step(x: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.precision, device):
            loss = forward_backward(model, x)
        optimizer_step(model.parameters(), optimizer, tcfg.grad_clip)
        return loss

    return model, step, sum(p.numel() for p in model.parameters()), len(model.blocks)


def _fla(cfg: ModelBenchConfig, anchor: str, device: torch.device):
    """fla's LM at the size's width and depth, through the same optimizer and precision."""
    from ..models.sizes import SIZES
    from ..train.trainer import autocast, build_optimizer, optimizer_step

    try:
        import fla.models as fm
    except Exception as e:  # fla can fail on import for reasons other than absence
        raise ImportError(f"fla is not importable ({type(e).__name__}: {e})") from e
    spec = SIZES[cfg.size]
    common = dict(hidden_size=spec.d_model, num_hidden_layers=spec.n_layers, vocab_size=cfg.vocab_size,
                  head_dim=64, state_size=128, expand=2)
    if anchor == "fla_log_linear_mamba2":
        model = fm.LogLinearMamba2ForCausalLM(fm.LogLinearMamba2Config(**common))
    else:
        from fla.layers import mamba2 as fla_mamba2

        if not getattr(fla_mamba2, "is_fast_path_available", False):
            # its fallback is a naive torch scan (it ran out of 139 GiB at 350m, T = 2K):
            # no anchor to measure against
            raise ImportError("fla's Mamba2 layer has no fast path here (it needs causal-conv1d and "
                              "mamba-ssm's compiled kernels)")
        model = fm.Mamba2ForCausalLM(fm.Mamba2Config(**common))
    model.to(device)
    if cfg.precision == "bf16-true":
        model.to(torch.bfloat16)
    model.train()
    tcfg = _train_config(cfg, "softmax")
    optimizer = build_optimizer(model, tcfg, device)

    def step(x: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.precision, device):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        optimizer_step(model.parameters(), optimizer, tcfg.grad_clip)
        return loss.detach()

    return model, step, sum(p.numel() for p in model.parameters()), spec.n_layers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(step: Callable, x: torch.Tensor, cfg: ModelBenchConfig, device: torch.device) -> dict:
    losses = []
    for _ in range(cfg.warmup):
        losses.append(step(x))
    times = []
    for _ in range(cfg.steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step(x))
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss}: the model does not train at this setting")
    row = {"step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "tok_s": cfg.tokens / step_s,
           "loss": loss}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _run_row(cfg: ModelBenchConfig, name: str, T: int, device: torch.device, out: Path) -> dict:
    row: dict = {"model": name, "T": T, "B": cfg.tokens // T}
    model = step = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        build = _fla if name in ANCHORS else _ours
        model, step, row["params"], layers = build(cfg, name, device)
        x = torch.randint(0, cfg.vocab_size, (cfg.tokens // T, T), device=device)
        row.update(_measure(step, x, cfg, device))
        if cfg.profile:
            row["profile"] = profile_step(step, x, device, layers, out / f"trace_{name}_T{T}.json")
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:  # noqa: BLE001 — a failed row (a kernel that will not compile) is recorded, the sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_model_bench(cfg: ModelBenchConfig, log: Callable[[str], None] = print) -> dict:
    device = torch.device(cfg.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model benchmarks need a CUDA GPU (or --device cpu for a smoke run)")
    result = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
        "rows": [],
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(cfg.mixers) + [a for a in cfg.anchors if device.type == "cuda"]
    for T in cfg.seq_lens:
        for name in names:
            row = _run_row(cfg, name, T, device, out)
            result["rows"].append(row)
            log(row_line(row))
            # rewritten after every row: a sweep cut short keeps what it measured
            write_json_atomic(out / "models.json", result)
    result["complete"] = True
    write_json_atomic(out / "models.json", result)
    plot_model_bench(result, out / "models.png")
    (out / "models.md").write_text(format_model_table(result) + "\n")
    return result


# --- profile -----------------------------------------------------------------------------------

# Kernel name patterns, first match wins: what each GPU kernel is for.
KERNEL_KINDS = (
    ("sequence op", ("_chunk_tree", "_tree_up", "_output", "_dstate", "_bwd_q", "_bwd_kv",  # ours
                     "_chunk_scan", "_chunk_state", "_state_passing", "_bmm_chunk", "_chunk_cumsum",  # SSD
                     "flash", "fmha", "attention", "cudnn", "chunk_log_linear", "chunk_linear", "chunk_fwd",
                     "chunk_bwd", "log_linear")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "ampere", "cublas", "splitk")),
    ("loss", ("_ce_", "cross_entropy", "logsumexp", "nll_loss", "softmax")),
    ("norm", ("rms", "norm")),
    ("conv", ("conv",)),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("copy / cast", ("copy", "cat", "transpose", "direct_copy", "fill")),
    ("other element-wise", ("elementwise", "vectorized", "reduce", "triton", "silu", "softplus", "mul", "add")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p in low for p in patterns):
            return kind
    return "other"


def profile_step(step: Callable, x: torch.Tensor, device: torch.device, layers: int, trace: Path) -> dict:
    """One profiled step: a Chrome trace at ``trace`` and GPU time by kernel kind (total and
    per layer) plus the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        step(x)
        _sync(device)
    prof.export_chrome_trace(str(trace))
    kernels = []
    for e in prof.key_averages():
        if device.type == "cuda" and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0) if device.type == "cuda" else e.self_cpu_time_total
        if us > 0:
            kernels.append((e.key, us / 1e3, e.count))
    total = sum(ms for _, ms, _ in kernels) or 1.0
    by_kind: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    top = sorted(kernels, key=lambda k: -k[1])[:15]
    return {
        "trace": trace.name,
        "gpu_ms": total,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "by_kind_ms_per_layer": {k: v / layers for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": ms, "calls": c, "kind": kernel_kind(n)} for n, ms, c in top],
    }


def format_profile(row: dict) -> str:
    p = row["profile"]
    lines = [f"{row['model']} T={row['T']}: GPU time {p['gpu_ms']:.1f} ms per step (trace {p['trace']})",
             "| kind | ms / step | ms / layer | share |", "|---|---|---|---|"]
    for kind, ms in p["by_kind_ms"].items():
        lines.append(f"| {kind} | {ms:.1f} | {p['by_kind_ms_per_layer'][kind]:.2f} | {100 * ms / p['gpu_ms']:.0f}% |")
    lines += ["", "| top kernels | kind | ms | calls |", "|---|---|---|---|"]
    lines += [f"| `{k['name'][:70]}` | {k['kind']} | {k['ms']:.1f} | {k['calls']} |" for k in p["top_kernels"]]
    return "\n".join(lines)


# --- output ------------------------------------------------------------------------------------

def row_line(r: dict) -> str:
    head = f"T={r['T']:>6} {r['model']:<22}"
    if "error" in r:
        return f"{head} {r['error']}"
    mem = f"  peak {r['peak_gib']:6.1f} GiB" if "peak_gib" in r else ""
    return f"{head} {r['tok_s'] / 1e3:8.1f}K tok/s  step {r['step_ms']:8.1f} ms{mem}  loss {r['loss']:.3f}"


def format_model_table(result: dict) -> str:
    """Markdown: one line per model, tokens/s at each T, and the largest peak memory."""
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    ts = sorted({r["T"] for r in rows})
    cell = {(r["model"], r["T"]): r for r in rows}
    lines = ["| model | params | " + " | ".join(f"T={t // 1024}K tok/s" for t in ts) + " | peak GiB |",
             "|---" * (len(ts) + 3) + "|"]
    for m in models:
        vals, peaks, params = [], [], None
        for t in ts:
            r = cell.get((m, t), {})
            params = params or r.get("params")
            vals.append(f"{r['tok_s'] / 1e3:.1f}K" if "tok_s" in r else r.get("error", "n/a")[:24])
            if "peak_gib" in r:
                peaks.append(r["peak_gib"])
        p = f"{params / 1e6:.0f}M" if params else "?"
        peak = f"{max(peaks):.1f}" if peaks else "n/a"
        lines.append(f"| {m} | {p} | " + " | ".join(vals) + f" | {peak} |")
    return "\n".join(lines)


def plot_model_bench(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in dict.fromkeys(r["model"] for r in result["rows"]):
        for ax, key, scale in ((axes[0], "tok_s", 1e-3), (axes[1], "peak_gib", 1.0)):
            pts = sorted((r["T"], r[key] * scale) for r in result["rows"] if r["model"] == m and key in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
    for ax, label in zip(axes, ("training tokens/s (thousands)", "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (tokens per step fixed)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"{result['device']}, {c['size']}, {c['precision']}, {c['tokens']} tokens/step"
                 + ("" if c["fused"] else ", fused ops off"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
