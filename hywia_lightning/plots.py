"""PNG plots of a run's report, written next to it: per-layer widths and fusion weights."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layer_widths(pruning: dict, path: Path) -> Path:
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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_fusion_weights(fusion: dict, path: Path) -> Path:
    """Blend weight of every granularity per layer, one panel per structure type."""
    kinds = {"self_attn": "attention heads", "mlp": "MLP channels"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
    for ax, (kind, title) in zip(axes, kinds.items()):
        rows = sorted((int(name.split(".")[1]), w) for name, w in fusion["weights"].items() if name.endswith(kind))
        for s, scheme in enumerate(fusion["schemes"]):
            ax.plot([layer for layer, _ in rows], [w[s] for _, w in rows], marker="o", markersize=3, label=scheme)
        ax.set(title=f"{title} ({fusion['mode']})", xlabel="layer", ylim=(0, 1))
    axes[0].set_ylabel("fusion weight")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(sections: dict, folder: Path) -> list[str]:
    """Every plot the report's sections allow; returns the file names."""
    written = []
    if "pruning" in sections:
        written.append(plot_layer_widths(sections["pruning"], folder / "layer_widths.png").name)
    if "fusion" in sections:
        written.append(plot_fusion_weights(sections["fusion"], folder / "fusion_weights.png").name)
    return written
