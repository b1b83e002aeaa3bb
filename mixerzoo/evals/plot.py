"""Accuracy plots of synthetic sweeps: one line per mixer, error bars over seeds.

Drawn with matplotlib's Agg canvas directly (no pyplot), so plotting never opens a window,
needs no display and leaves the caller's pyplot backend alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANEL_OF = {"seq_len": "d_model", "d_model": "seq_len"}
AXIS_LABEL = {"seq_len": "sequence length", "d_model": "model width (d_model)"}


def plot_summary(
    summary: list[dict[str, Any]],
    path: str | Path,
    *,
    x_axis: str = "seq_len",
    title: str = "",
    panel_title: str = "{key} = {value}",
) -> Path:
    """Save accuracy vs ``x_axis`` to ``path`` (PNG); one panel per value of the other axis.

    ``summary`` rows need ``mixer``, ``seq_len``, ``d_model``, ``acc_mean`` and ``acc_std``
    (as :func:`mixerzoo.evals.synthetic.summarise` makes them).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x_axis not in PANEL_OF:
        raise ValueError(f"x_axis must be one of {tuple(PANEL_OF)}, got {x_axis!r}")
    if not summary:
        raise ValueError("nothing to plot: the summary is empty")
    panel_key = PANEL_OF[x_axis]
    panels = sorted({r[panel_key] for r in summary}, key=lambda v: (v is None, v))
    mixers = list(dict.fromkeys(r["mixer"] for r in summary))

    fig = Figure(figsize=(4.2 * len(panels) + 1.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    xs_all = sorted({r[x_axis] for r in summary if r[x_axis] is not None})
    for ax, panel in zip(axes, panels):
        for i, mixer in enumerate(mixers):
            rows = sorted(
                (r for r in summary if r["mixer"] == mixer and r[panel_key] == panel),
                key=lambda r: r[x_axis],
            )
            if not rows:
                continue
            ax.errorbar(
                [r[x_axis] for r in rows],
                [r["acc_mean"] for r in rows],
                yerr=[r["acc_std"] for r in rows],
                marker="o", markersize=4, capsize=3, linewidth=1.5,
                color=f"C{i % 10}", label=mixer,
            )
        # Sweeps double the length or width, so a log2 axis spaces the points evenly.
        if len(xs_all) > 1 and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
            ax.set_xscale("log", base=2)
        if xs_all:
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(AXIS_LABEL[x_axis])
        if panel is not None:
            ax.set_title(panel_title.format(key=panel_key, value=panel), fontsize=10)
    axes[0].set_ylabel("accuracy")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
