"""Disconnectivity graphs: which minima merge into one basin at which loss level.

Becker & Karplus (1997); Wales, Miller & Walsh (1998). Given the losses of ``n`` minima and, for pairs
connected by a (minimum-energy) path, the loss of the highest point on that path (the saddle), two minima
belong to the same basin at level ``E`` when some chain of paths joins them without exceeding ``E``. The
level at which ``i`` and ``j`` first merge is the minimax saddle over all chains, which is exactly
single-linkage clustering with the saddle losses as distances (``scipy.cluster.hierarchy``). The tree is
drawn with each minimum hanging from its merge level down to its own loss.

Example::

    >>> import numpy as np
    >>> saddles = np.full((3, 3), np.inf)
    >>> saddles[0, 1] = saddles[1, 0] = 2.0
    >>> saddles[1, 2] = saddles[2, 1] = 5.0
    >>> disconnectivity_tree(np.array([0.0, 1.0, 0.5]), saddles).merge_levels.tolist()
    [2.0, 5.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import dendrogram, linkage
from scipy.spatial.distance import squareform


@dataclass
class DisconnectivityTree:
    """The single-linkage tree (``scipy`` linkage matrix) of minima merged at saddle losses."""

    minima: np.ndarray
    linkage: np.ndarray
    merge_levels: np.ndarray
    labels: np.ndarray  # the name of each minimum in the figure (default 0 .. n-1)
    unreachable: float = np.inf  # the level at which groups with no known path between them are joined
    offset: float = 0.0  # ``linkage`` holds the levels minus this (scipy takes no negative heights)


def disconnectivity_tree(
    minima: np.ndarray, saddles: np.ndarray, labels: np.ndarray | None = None
) -> DisconnectivityTree:
    """Merge minima (losses, ``(n,)``) at increasing levels given saddle losses (``(n, n)``, symmetric, ``inf``
    where no path is known); ``labels`` name the minima in the figure (e.g. their database ids).

    Raises:
        ValueError: for mismatched shapes, an asymmetric matrix, or a saddle below one of its minima.
    """
    minima = np.asarray(minima, dtype=float)
    saddles = np.asarray(saddles, dtype=float).copy()
    n = len(minima)
    if saddles.shape != (n, n) or not np.allclose(saddles, saddles.T, equal_nan=True):
        raise ValueError(f"`saddles` must be a symmetric ({n}, {n}) matrix, got shape {saddles.shape}.")
    np.fill_diagonal(saddles, 0.0)
    off = ~np.eye(n, dtype=bool)
    low = np.maximum.outer(minima, minima)
    if np.any(saddles[off] < low[off] - 1e-12):
        raise ValueError("a saddle lies below one of the minima it connects. HINT: pass saddle losses, not barriers.")
    finite = np.isfinite(saddles[off])
    unreachable = (saddles[off][finite].max() if finite.any() else minima.max()) + 1.0
    saddles[off & ~np.isfinite(saddles)] = unreachable  # disconnected parts join above everything known
    # a loss may be negative (a Gaussian NLL, an ELBO): the levels are shifted above 0 for scipy, and back
    offset = min(0.0, float(minima.min()) - 1.0) if n else 0.0
    Z = linkage(squareform(np.where(off, saddles - offset, 0.0), checks=False), method="single")
    labels = np.arange(n) if labels is None else np.asarray(labels)
    return DisconnectivityTree(minima, Z, Z[:, 2] + offset, labels, float(unreachable), offset)


def disconnectivity_figure(tree: DisconnectivityTree, title: str = "disconnectivity graph") -> Figure:
    """Draw the tree: minima at their losses, joined at their merge levels."""
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot()
    d = dendrogram(tree.linkage, no_plot=True)
    leaf_x = {5 + 10 * i: leaf for i, leaf in enumerate(d["leaves"])}
    for xs, heights in zip(d["icoord"], d["dcoord"], strict=True):
        ys = [h + tree.offset for h in heights]
        for end in (0, 3):
            if heights[end] == 0.0 and xs[end] in leaf_x:
                ys[end] = tree.minima[leaf_x[xs[end]]]
        ax.plot(xs, ys, color="k", lw=1.0)
    for x, leaf in leaf_x.items():
        ax.plot([x], [tree.minima[leaf]], "o", color="crimson", ms=4)
    if np.any(tree.merge_levels >= tree.unreachable):
        ax.axhline(tree.unreachable, color="0.5", ls="--", lw=0.8)
        ax.text(
            0.99,
            tree.unreachable,
            "no path known",
            transform=ax.get_yaxis_transform(),
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.4",
        )
    small = len(leaf_x) > 15
    ax.set_xticks(
        list(leaf_x),
        [str(tree.labels[leaf]) for leaf in leaf_x.values()],
        fontsize=6 if small else None,
        rotation=90 if small else 0,
    )
    ax.set_xlabel("minimum")
    ax.set_ylabel("loss")
    ax.set_title(title)
    return fig
