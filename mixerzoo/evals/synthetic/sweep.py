"""The sweep: every (length, width, mixer, seed, lr) run, results saved as each one finishes.

Runs are planned first, each with a key that hashes every setting its result depends on, so
that a rerun into the same ``out_dir`` keeps the finished runs and trains only the rest.
With ``workers > 1`` runs go to a pool of processes (spawned, one CUDA device each, round-robin
over the visible GPUs); the parent only collects records and writes the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import torch

from mixerzoo.files import check_out_dir, jsonable

from .config import SyntheticRunConfig, resolve_device, resolve_mixers
from .results import param_spread, select_best_lr, summarise, write_results
from .training import _build, _non_embedding, _width, evaluate, train_one

# Fields that say which runs exist or where results go, not what one run computes.
_NOT_IN_KEY = ("mixers", "seq_lens", "d_models", "seeds", "learning_rates", "x_axis", "task",
               "task_overrides", "out_dir", "progress", "workers", "resume", "device")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    index: int
    mixer: str
    seq_len: int
    d_model: int | None
    seed: int
    lr: float
    key: str


def _model_identity(mixer: str) -> dict[str, Any]:
    """What a mixer name stands for today (its class, options and initialisation rule): a name
    that comes to mean another model (as ``loglinear_adaptive`` did, or every mixer when the
    reference initialisation came in) must not match runs of the old one."""
    from mixerzoo.registry import get_mixer_spec

    from mixerzoo.ops.fused import default_kernels

    spec = get_mixer_spec(mixer)
    return {"class": spec.class_path, "options": spec.options, "init": spec.init, "kernels": default_kernels(),
            "version": MODEL_VERSION}


# Raised when what every model is changes without the registry entries showing it.
# 2: reference initialisation (2026-12-08).
MODEL_VERSION = 2


def plan_runs(cfg: SyntheticRunConfig, mixers: list[str], device: torch.device) -> list[RunSpec]:
    """Every run of the sweep in order, each with the hash of what its result depends on."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_IN_KEY}
    models = {m: _model_identity(m) for m in mixers}
    specs = []
    for seq_len in cfg.seq_lens:
        task = cfg.task_for(seq_len).to_dict()
        for d_model in cfg.d_models:
            for mixer in mixers:
                for seed in cfg.seeds:
                    for lr in cfg.learning_rates:
                        what = {"mixer": mixer, "model": models[mixer], "seq_len": seq_len, "d_model": d_model,
                                "seed": seed, "lr": lr, "task": task, "device_type": device.type, **shared}
                        key = hashlib.sha256(json.dumps(jsonable(what), sort_keys=True).encode()).hexdigest()[:16]
                        specs.append(RunSpec(len(specs), mixer, seq_len, d_model, seed, lr, key))
    return specs


def finished_runs(out_dir: str | Path | None) -> dict[str, dict[str, Any]]:
    """The run records of an earlier sweep in ``out_dir``, by key (empty when there is none).

    A results.json that cannot be read is reported and ignored (its runs are trained again),
    never deleted: write_results replaces it only once a new run has finished."""
    if out_dir is None:
        return {}
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text()).get("runs", [])
        return {r["key"]: r for r in runs if isinstance(r, dict) and r.get("key")}
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"{path} could not be read ({e}); its runs will be trained again", stacklevel=2)
        return {}


_EVAL_SETS: dict[tuple, list] = {}  # per process: (seq_len, task) -> fixed held-out batches


def _eval_set(cfg: SyntheticRunConfig, task, device: torch.device) -> list:
    key = (json.dumps(task.to_dict(), sort_keys=True), str(device), cfg.eval_seed, cfg.eval_batches,
           cfg.eval_batch_size)
    if key not in _EVAL_SETS:
        # One fixed held-out set per task variant, shared by every mixer, seed and lr.
        _EVAL_SETS[key] = task.build(cfg.eval_seed, device).batches(cfg.eval_batches, cfg.eval_batch_size)
    return _EVAL_SETS[key]


def execute_run(cfg: SyntheticRunConfig, spec: RunSpec, device: torch.device,
                on_eval: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Build, train and evaluate one run; its record (see :func:`run_synthetic`)."""
    task = cfg.task_for(spec.seq_len)
    # Same init for every lr of a seed; the caller's RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = _build(spec.mixer, cfg, task, spec.d_model)
    model = model.to(device)
    record = train_one(model, task, _eval_set(cfg, task, device), cfg, lr=spec.lr, seed=spec.seed,
                       device=device, on_eval=on_eval)
    lengths = {}
    for factor in cfg.eval_length_factors:
        longer = task.replace(seq_len=spec.seq_len * factor)
        lengths[str(longer.seq_len)] = evaluate(model, _eval_set(cfg, longer, device), cfg.precision)
    x = spec.seq_len if cfg.x_axis == "seq_len" else spec.d_model
    width = spec.d_model if spec.d_model is not None else _width(model)
    return {
        "key": spec.key,
        "mixer": spec.mixer,
        "seq_len": spec.seq_len,
        "d_model": width,
        "x": x if x is not None else width,
        "seed": spec.seed,
        "lr": spec.lr,
        # the size's matched count: embeddings and LM head excluded
        "params": _non_embedding(model),
        "params_total": model.num_parameters(),
        "task": task.to_dict(),
        **record,
        "length_acc": lengths,
    }


def run_synthetic(config: SyntheticRunConfig) -> dict[str, Any]:
    """Run the sweep; returns ``{"config", "environment", "complete", "runs", "summary",
    "param_spread", "files"}`` and writes the files when ``config.out_dir`` is set.

    Every run record holds: key (hash of its settings), mixer, seq_len, d_model, x, seed, lr,
    steps, stop_reason, final_acc, best_acc, best_step, final_loss, time_s, first_step_s
    (compilation included), params (non-embedding), params_total, selected (best lr of its
    group), history (eval step and accuracy), length_acc (accuracy of the final model at each
    longer length), resumed (taken from an earlier sweep in out_dir).
    """
    from tqdm.auto import tqdm

    cfg = config
    if cfg.out_dir is not None:
        check_out_dir(cfg.out_dir)
    device = resolve_device(cfg.device)
    mixers = resolve_mixers(cfg.mixers)
    _EVAL_SETS.clear()
    specs = plan_runs(cfg, mixers, device)
    earlier = finished_runs(cfg.out_dir) if cfg.resume else {}
    done: dict[int, dict[str, Any]] = {}
    for spec in specs:
        if spec.key in earlier:
            done[spec.index] = {**earlier[spec.key], "resumed": True}
    todo = [s for s in specs if s.index not in done]
    bar = tqdm(total=len(specs), initial=len(done), desc=f"synth {cfg.task.name}", unit="run",
               disable=not cfg.progress)

    def finish(spec: RunSpec, record: dict[str, Any]) -> None:
        done[spec.index] = {**record, "resumed": False}
        bar.set_postfix({"mixer": spec.mixer, "T": spec.seq_len, "seed": spec.seed,
                         "acc": f"{record['best_acc']:.3f}"}, refresh=False)
        bar.update(1)
        if cfg.out_dir is not None and len(done) < len(specs):
            _write_partial(cfg, device, mixers, [done[i] for i in sorted(done)])

    try:
        if cfg.workers > 1 and len(todo) > 1:
            _run_pool(cfg, todo, device, finish)
        else:
            for spec in todo:
                tag = {"mixer": spec.mixer, "T": spec.seq_len, "seed": spec.seed, "lr": f"{spec.lr:.0e}"}

                def on_eval(step: int, acc: float, tag=tag) -> None:
                    bar.set_postfix({**tag, "step": step, "acc": f"{acc:.3f}"}, refresh=False)
                    _throttled_refresh(bar)

                finish(spec, execute_run(cfg, spec, device, on_eval))
    finally:
        bar.close()

    results = _collect(cfg, device, mixers, [done[i] for i in sorted(done)], complete=True)
    if cfg.out_dir is not None:
        results["files"] = write_results(results, cfg.out_dir)
    return results


def worker_devices(device: torch.device, workers: int) -> list[str]:
    """The device of each worker: CUDA round-robin over the visible GPUs (a device given
    with an index keeps every worker on it), else the CPU."""
    if device.type != "cuda":
        return [str(device)] * workers
    if device.index is not None:
        return [str(device)] * workers
    n = torch.cuda.device_count()
    return [f"cuda:{i % n}" for i in range(workers)]


_WORKER_DEVICE: list[torch.device] = []


def _init_worker(queue, threads: int) -> None:
    _WORKER_DEVICE.append(torch.device(queue.get()))
    torch.set_num_threads(threads)
    if _WORKER_DEVICE[0].type == "cuda":
        torch.cuda.set_device(_WORKER_DEVICE[0])


def _worker_run(cfg: SyntheticRunConfig, spec: RunSpec) -> dict[str, Any]:
    return execute_run(cfg, spec, _WORKER_DEVICE[0])


def _run_pool(cfg: SyntheticRunConfig, todo: list[RunSpec], device: torch.device,
              finish: Callable[[RunSpec, dict[str, Any]], None]) -> None:
    """Run ``todo`` on ``cfg.workers`` spawned processes. Mixers and tasks registered only in
    this process (``register_mixer`` at run time) do not exist there: use a registry file or
    entry points for those, or ``workers=1``."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    workers = min(cfg.workers, len(todo))
    queue = ctx.Queue()
    for name in worker_devices(device, workers):
        queue.put(name)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(queue, threads)) as pool:
        futures = {pool.submit(_worker_run, cfg, spec): spec for spec in todo}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _write_partial(cfg: SyntheticRunConfig, device: torch.device, mixers: list[str],
                   runs: list[dict[str, Any]]) -> None:
    """Save the finished runs, so that a sweep stopped part-way (killed, out of time) keeps
    them; a failure to save is reported and the sweep goes on."""
    try:
        write_results(_collect(cfg, device, mixers, runs, complete=False), cfg.out_dir)
    except (OSError, ValueError, RuntimeError) as e:
        warnings.warn(f"could not save the partial results to {cfg.out_dir}: {e}", stacklevel=2)


def _collect(cfg: SyntheticRunConfig, device: torch.device, mixers: list[str],
             runs: list[dict[str, Any]], *, complete: bool) -> dict[str, Any]:
    select_best_lr(runs)
    return {
        "config": {**cfg.to_dict(), "mixers": mixers, "device": str(device)},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "complete": complete,
        "runs": runs,
        "summary": summarise(runs),
        "param_spread": param_spread(runs),
        "files": {},
    }


def _throttled_refresh(bar: Any, every_s: float = 0.5) -> None:
    # Evaluations can come many times a second on small models; redraw at most every
    # ``every_s`` so that logs captured from a non-terminal stay readable.
    now = time.monotonic()
    if now - getattr(bar, "_last_redraw", 0.0) >= every_s:
        bar._last_redraw = now
        bar.refresh()
