"""PNG figures of the analyses in :mod:`engram_jax.analysis` (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_logit_lens(curves: dict, out_png: str) -> None:
    """``curves``: ``{label: [KL per block]}``; one line per model, block index 1-based."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, kl in curves.items():
        ax.plot(np.arange(1, len(kl) + 1), kl, marker="o", label=label)
    ax.set_xlabel("block")
    ax.set_xticks(range(1, 1 + max(len(kl) for kl in curves.values())))
    ax.set_ylabel("KL(final || block), nats/token")
    ax.set_title("LogitLens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_cka(
    cka_AxB: np.ndarray,
    alignment_A: np.ndarray,
    out_png: str,
    *,
    label_a: str = "model",
    label_b: str = "compare",
) -> None:
    """CKA heatmap (rows: blocks of ``label_a``) with the soft alignment index overlaid."""
    plt = _pyplot()
    a, b = cka_AxB.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * b, 1.0 + 0.45 * a))
    im = ax.imshow(
        cka_AxB,
        origin="lower",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        extent=(0.5, b + 0.5, 0.5, a + 0.5),
        aspect="auto",
    )
    ax.plot(
        alignment_A,
        np.arange(1, a + 1),
        color="red",
        marker="o",
        lw=1.5,
        label="soft alignment (top-5)",
    )
    ax.plot([0.5, min(a, b) + 0.5], [0.5, min(a, b) + 0.5], color="white", ls="--", lw=0.8)
    ax.set_xlabel(f"{label_b} block")
    ax.set_ylabel(f"{label_a} block")
    ax.set_xticks(range(1, b + 1))
    ax.set_yticks(range(1, a + 1))
    ax.set_title("linear CKA (unbiased HSIC)")
    ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_gates(gates: dict, token_labels: list[str], out_png: str) -> None:
    """Per-token gate heatmap: one row per (Engram layer, branch), tokens along x."""
    plt = _pyplot()
    rows, names = [], []
    for layer in sorted(gates):
        g_TxM = np.asarray(gates[layer])
        for m in range(g_TxM.shape[1]):
            rows.append(g_TxM[:, m])
            names.append(f"layer {layer} / branch {m}")
    mat = np.stack(rows)
    t = mat.shape[1]
    fig, ax = plt.subplots(figsize=(min(60.0, 1.5 + 0.28 * t), 1.2 + 0.35 * len(rows)))
    im = ax.imshow(mat, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xticks(range(t))
    ax.set_xticklabels(token_labels, rotation=90, fontsize=7, family="monospace")
    ax.set_title("Engram gate alpha per token")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def token_label(text: str) -> str:
    """A token's text made visible on an axis: whitespace shown as symbols."""
    return (text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")) or "\u2205"
