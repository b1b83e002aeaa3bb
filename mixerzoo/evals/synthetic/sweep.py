"""The sweep: every (length, width, mixer, seed, lr) run in turn, results saved after each."""

from __future__ import annotations

import platform
import time
import warnings
from typing import Any

import torch

from mixerzoo.files import check_out_dir

from .config import SyntheticRunConfig, resolve_device, resolve_mixers
from .results import param_spread, select_best_lr, summarise, write_results
from .training import _build, _non_embedding, _width, train_one


def run_synthetic(config: SyntheticRunConfig) -> dict[str, Any]:
    """Run the sweep; returns ``{"config", "environment", "complete", "runs", "summary",
    "param_spread", "files"}`` and writes the files when ``config.out_dir`` is set.

    Every run record holds: mixer, seq_len, d_model, x, seed, lr, steps, stop_reason,
    final_acc, best_acc, best_step, final_loss, time_s, first_step_s (compilation included),
    params (non-embedding), params_total, selected (best lr of its group), history (eval step and accuracy).
    """
    from tqdm.auto import tqdm

    cfg = config
    if cfg.out_dir is not None:
        check_out_dir(cfg.out_dir)
    device = resolve_device(cfg.device)
    mixers = resolve_mixers(cfg.mixers)
    grid = [(L, d) for L in cfg.seq_lens for d in cfg.d_models]
    total = len(grid) * len(mixers) * len(cfg.seeds) * len(cfg.learning_rates)
    runs: list[dict[str, Any]] = []
    eval_sets: dict[int, list] = {}
    bar = tqdm(total=total, desc=f"synth {cfg.task.name}", unit="run", disable=not cfg.progress)
    try:
        for seq_len, d_model in grid:
            task = cfg.task_for(seq_len)
            if seq_len not in eval_sets:
                # One fixed held-out set per length, shared by every mixer, seed and lr.
                eval_sets[seq_len] = task.build(cfg.eval_seed, device).batches(
                    cfg.eval_batches, cfg.eval_batch_size
                )
            for mixer in mixers:
                for seed in cfg.seeds:
                    for lr in cfg.learning_rates:
                        # Same init for every lr of a seed; the caller's RNG is left untouched.
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            model = _build(mixer, cfg, task, d_model)
                        model = model.to(device)
                        x = seq_len if cfg.x_axis == "seq_len" else d_model
                        tag = {"mixer": mixer, cfg.x_axis: x, "seed": seed, "lr": f"{lr:.0e}"}

                        def on_eval(step: int, acc: float, tag=tag) -> None:
                            bar.set_postfix({**tag, "step": step, "acc": f"{acc:.3f}"},
                                            refresh=False)
                            _throttled_refresh(bar)

                        record = train_one(
                            model, task, eval_sets[seq_len], cfg,
                            lr=lr, seed=seed, device=device, on_eval=on_eval,
                        )
                        runs.append(
                            {
                                "mixer": mixer,
                                "seq_len": seq_len,
                                "d_model": d_model if d_model is not None else _width(model),
                                "x": x if x is not None else _width(model),
                                "seed": seed,
                                "lr": lr,
                                # the size's matched count: embeddings and LM head excluded
                                "params": _non_embedding(model),
                                "params_total": model.num_parameters(),
                                "task": task.to_dict(),
                                **record,
                            }
                        )
                        bar.set_postfix({**tag, "acc": f"{record['best_acc']:.3f}"},
                                        refresh=False)
                        bar.update(1)
                        del model
                        if cfg.out_dir is not None and len(runs) < total:
                            _write_partial(cfg, device, mixers, runs)
    finally:
        bar.close()

    results = _collect(cfg, device, mixers, runs, complete=True)
    if cfg.out_dir is not None:
        results["files"] = write_results(results, cfg.out_dir)
    return results


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
