"""Matplotlib figures of an Inspection, for ``lmlab inspect --png DIR`` and notebooks.

Each ``plot_*`` function draws into a new figure and returns it (a notebook shows it inline); ``write_pngs``
saves them all: attention.png (every head of one layer), embeddings.png (PCA), positions.png, logit_lens.png
(when the model has an LM head) and sampling.png (the next-token bars, cut tokens greyed).
"""

from __future__ import annotations

from pathlib import Path

from lmlab.inspect.core import Inspection


def _plt():
    import matplotlib.pyplot as plt  # the current backend: inline in a notebook, Agg for `lmlab inspect --png`

    return plt


def _label(piece: str) -> str:
    return piece.replace("Ġ", " ").replace("Ċ", "\\n").replace("▁", " ")


def _axes_tokens(insp: Inspection, stack: str) -> tuple[list[str], list[str]]:
    src = [_label(t) for t in insp.tokens]
    tgt = [_label(t) for t in insp.target_tokens]
    if insp.arch != "encoder_decoder" or stack == "encoder":
        return src, src
    return (tgt, tgt) if stack == "decoder" else (tgt, src)


def plot_attention(insp: Inspection, layer: int | None = None, stack: str | None = None):
    """Every head of one layer as a grid of (query x key) heatmaps."""
    plt = _plt()
    stack = stack or insp.main_stack
    layer = insp.layers[stack][-1] if layer is None else layer
    insp.attention(layer, 0, stack)  # validates stack and layer
    w = insp.attentions[stack][insp.layers[stack].index(layer)]  # (H, T, S)
    H = w.shape[0]
    cols = min(4, H)
    rows = -(-H // cols)
    q_tokens, k_tokens = _axes_tokens(insp, stack)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(w[h].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        small = len(k_tokens) <= 24
        ax.set_xticks(range(len(k_tokens)) if small else [])
        ax.set_yticks(range(len(q_tokens)) if small else [])
        if small:
            ax.set_xticklabels(k_tokens, rotation=90, fontsize=6)
            ax.set_yticklabels(q_tokens, fontsize=6)
    fig.suptitle(f"{insp.model}: {stack} attention, layer {layer} (rows: queries, columns: keys)")
    fig.tight_layout()
    return fig


def plot_embeddings(insp: Inspection):
    """The text's token embeddings projected on their first two principal components."""
    plt = _plt()
    pca = insp.embeddings["pca"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(pca[:, 0], pca[:, 1], s=12)
    for (x, y), t in zip(pca.tolist(), insp.tokens):
        ax.annotate(_label(t), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ev = insp.embeddings["pca_explained"]
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
    ax.set_title(f"{insp.model}: token embeddings (PCA)")
    fig.tight_layout()
    return fig


def plot_positions(insp: Inspection):
    """The positional scheme: sinusoidal table, learned similarity, RoPE wavelengths or T5 bias per head."""
    plt = _plt()
    p = insp.positions
    kind = p["kind"]
    if kind == "t5_relative":
        stacks = [s for s in ("encoder", "decoder") if f"{s}_bias" in p]
        fig, axes = plt.subplots(1, len(stacks), figsize=(6 * len(stacks), 3.5), squeeze=False)
        for ax, s in zip(axes.flat, stacks):
            bias = p[f"{s}_bias"]
            lim = float(bias.abs().max())
            im = ax.imshow(bias.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_xlabel("relative-position bucket")
            ax.set_ylabel("head")
            ax.set_title(f"T5 {s}: learned bias per head and bucket")
            fig.colorbar(im, ax=ax)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        if kind == "sinusoidal":
            im = ax.imshow(p["sinusoidal"].numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_xlabel("dimension")
            ax.set_ylabel("position")
            ax.set_title("sinusoidal position table")
            fig.colorbar(im, ax=ax)
        elif kind == "learned":
            im = ax.imshow(p["learned_similarity"].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xlabel("position")
            ax.set_ylabel("position")
            ax.set_title("learned position embeddings: cosine similarity")
            fig.colorbar(im, ax=ax)
        elif kind == "rope":
            wl = p["rope_wavelength"]
            ax.semilogy(range(len(wl)), wl.numpy(), marker=".")
            ax.set_xlabel("rotated dimension pair")
            ax.set_ylabel("wavelength (tokens per turn)")
            ax.set_title("RoPE rotation frequencies")
        else:
            ax.text(0.5, 0.5, "no positional encoding", ha="center")
    fig.suptitle(f"{insp.model}: positions ({kind})")
    fig.tight_layout()
    return fig


def plot_logit_lens(insp: Inspection):
    """Layer x position grid: the top token decoded from each block's output, shaded by its probability."""
    plt = _plt()
    lens = insp.logit_lens
    if lens is None:
        raise ValueError("this model has no LM head, so no logit lens")
    probs = lens["probs"][..., 0]  # (L, P)
    L, P = probs.shape
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * P), max(4, 0.32 * L)))
    ax.imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for l in range(L):
        for c in range(P):
            ax.text(c, l, _label(lens["tokens"][l][c][0])[:10], ha="center", va="center", fontsize=6,
                    color="white" if probs[l, c] > 0.5 else "black")
    tokens = insp.target_tokens if insp.arch == "encoder_decoder" else insp.tokens
    ax.set_xticks(range(P))
    ax.set_xticklabels([_label(tokens[i]) for i in lens["positions"]], rotation=90, fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(f"{insp.model}: logit lens (top-1 next token per block and position)")
    fig.tight_layout()
    return fig


def plot_sampling(insp: Inspection, top: int = 20):
    """The most likely next tokens; those the sampling filter cuts are grey."""
    plt = _plt()
    items = insp.next_token(top)
    if not items:
        raise ValueError("this model has no LM head, so no next-token distribution")
    s = insp.output["sampling"]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(items) + 1.2))
    labels = [_label(t["token"]) for t in items][::-1]
    probs = [t["prob"] for t in items][::-1]
    colors = ["#2563eb" if t["kept"] else "#c0c4c9" for t in items][::-1]
    ax.barh(range(len(items)), probs, color=colors)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("probability")
    kept = int(insp.output["kept"].sum())
    ax.set_title(f"next token: temperature={s['temperature']}, top_k={s['top_k']}, top_p={s['top_p']}, "
                 f"min_p={s['min_p']}: {kept} kept", fontsize=9)
    fig.tight_layout()
    return fig


def write_pngs(insp: Inspection, directory, layer: int | None = None) -> list[Path]:
    """Save every figure that applies to this model into `directory` -> the paths written."""
    plt = _plt()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {"attention": lambda: plot_attention(insp, layer), "embeddings": lambda: plot_embeddings(insp),
               "positions": lambda: plot_positions(insp)}
    if insp.arch == "encoder_decoder":
        figures["cross_attention"] = lambda: plot_attention(insp, layer, "cross")
    if insp.logit_lens is not None:
        figures["logit_lens"] = lambda: plot_logit_lens(insp)
        figures["sampling"] = lambda: plot_sampling(insp)
    written = []
    for name, make in figures.items():
        fig = make()
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["plot_attention", "plot_embeddings", "plot_positions", "plot_logit_lens", "plot_sampling", "write_pngs"]
