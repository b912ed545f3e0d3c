"""PNG plots of a run's report, written next to it: per-layer kept widths, fusion weights,
importance distributions by granularity, and the recovery loss curve.

Each plot is built from the report's sections only (a figure per section a run produced), so the
same figures can go to a file and to a logger (TensorBoard's ``add_figure``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..files import write_atomic  # noqa: E402
from .markdown import recovery_curves  # noqa: E402

DPI = 80  # small files: a few tens of KB each


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def figure_layer_widths(pruning: dict) -> Figure:
    """Kept fraction of query heads, KV heads and MLP channels per layer."""
    widths = pruning["layer_widths"]
    fig, ax = plt.subplots(figsize=(7, 3))
    for key, label in (("num_attention_heads", "query heads"), ("num_key_value_heads", "KV heads"),
                       ("intermediate_size", "MLP channels")):
        values = widths[key]
        dense = max(values)
        ax.plot(range(len(values)), [v / dense for v in values], marker="o", markersize=3, label=label)
    ax.set(xlabel="layer", ylabel="kept / widest layer", ylim=(0, 1.05),
           title=f"{pruning['granularity']}: {100 * pruning['fraction_removed']:.1f}% of parameters removed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_fusion_weights(fusion: dict) -> Figure:
    """Blend weight of every granularity per layer, one panel per structure type."""
    kinds = {"self_attn": "attention heads", "mlp": "MLP channels"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
    for ax, (kind, title) in zip(axes, kinds.items()):
        rows = sorted((_layer(name), w) for name, w in fusion["weights"].items() if name.endswith(kind))
        for s, scheme in enumerate(fusion["schemes"]):
            ax.plot([layer for layer, _ in rows], [w[s] for _, w in rows], marker="o", markersize=3, label=scheme)
        ax.set(title=f"{title} ({fusion['mode']})", xlabel="layer", ylim=(0, 1))
    axes[0].set_ylabel("fusion weight")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_importance(importance: dict) -> Figure:
    """Per layer and granularity: the median score and its 10–90% band, one panel per structure
    type, log scale (granularities differ by orders of magnitude)."""
    q = importance["quantiles"]
    lo, mid, hi = q.index(0.1), q.index(0.5), q.index(0.9)
    kinds = {"self_attn": "attention heads", "mlp": "MLP channels"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (kind, title) in zip(axes, kinds.items()):
        groups = sorted((_layer(name), per) for name, per in importance["groups"].items() if name.endswith(kind))
        for scheme in importance["schemes"]:
            rows = [(layer, per[scheme]) for layer, per in groups if scheme in per]
            if not rows:
                continue
            layers = [layer for layer, _ in rows]
            floor = 1e-30  # a log axis cannot show 0
            line, = ax.plot(layers, [max(v[mid], floor) for _, v in rows], marker="o", markersize=3, label=scheme)
            ax.fill_between(layers, [max(v[lo], floor) for _, v in rows], [max(v[hi], floor) for _, v in rows],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=f"{title}: median, 10–90%", xlabel="layer", yscale="log")
    axes[0].set_ylabel("importance score")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_recovery_loss(recovery: dict) -> Figure:
    """The recovery's losses over steps: the objective, its parts (KL, LM loss), on validation too."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for label, curve in recovery_curves(recovery):
        ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o" if len(curve) < 30 else None,
                markersize=3, label=label)
    ax.set(xlabel="step", ylabel="nats per token", title="recovery")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _has_curve(recovery) -> bool:
    return isinstance(recovery, dict) and bool(recovery_curves(recovery))


# file name, section it draws, whether the section has something to draw, builder
PLOTS: tuple[tuple[str, str, Callable[[object], bool], Callable[[dict], Figure]], ...] = (
    ("layer_widths.png", "pruning", bool, figure_layer_widths),
    ("fusion_weights.png", "fusion", bool, figure_fusion_weights),
    ("importance.png", "importance", lambda s: bool(s and s.get("groups")), figure_importance),
    ("recovery_loss.png", "recovery", _has_curve, figure_recovery_loss),
)


def figures(sections: dict) -> dict[str, Figure]:
    """``{file name: figure}`` for every plot the report's sections allow (the caller closes them)."""
    return {name: build(sections[section]) for name, section, drawable, build in PLOTS
            if section in sections and drawable(sections[section])}


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically (a reader never sees half an image)."""
    return write_atomic(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))


def write_plots(sections: dict, folder: Path) -> list[str]:
    """Write every plot the report's sections allow into ``folder``; returns the file names."""
    written = []
    for name, fig in figures(sections).items():
        save(fig, folder / name)
        plt.close(fig)
        written.append(name)
    return written
