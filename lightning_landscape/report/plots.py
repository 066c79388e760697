"""Figures of the analyses (matplotlib ``Figure`` objects, no pyplot state; the Reporter saves and logs them).

Example::

    >>> import numpy as np
    >>> fig = spectral_density_figure([(10, np.linspace(-1, 1, 5), np.ones(5))])
    >>> fig.axes[0].get_xlabel()
    'Hessian eigenvalue'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure


def spectral_density_figure(history: Sequence[tuple[int, np.ndarray, np.ndarray]], log: bool = True) -> Figure:
    """Hessian eigenvalue densities ``(step, grid, density)`` over training, coloured by step."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    steps = [s for s, _, _ in history]
    norm = Normalize(min(steps), max(max(steps), min(steps) + 1))
    cmap = colormaps["viridis"]
    floor = 1e-5 * max(float(np.max(d)) for _, _, d in history)
    for step, grid, density in history:
        ax.plot(grid, np.maximum(density, floor) if log else density, color=cmap(norm(step)), lw=1.2)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title("Hessian spectral density over training")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="optimizer step")
    return fig


def eigenvalue_figure(
    steps: Sequence[int], eigenvalues: Sequence[Sequence[float]], limit: float | None = None
) -> Figure:
    """Top-k Hessian eigenvalues versus step, with the optimizer's stability limit (``2 / lr`` for plain SGD)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    values = np.asarray([list(v) for v in eigenvalues], dtype=float)
    for i in range(values.shape[1]):
        ax.plot(steps, values[:, i], marker="o", ms=3, lw=1.2, label=f"lambda_{i + 1}")
    if limit:
        ax.axhline(limit, color="k", ls="--", lw=1, label=f"stability limit of the optimizer ({limit:.4g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title("Top Hessian eigenvalues")
    ax.legend(fontsize=8)
    return fig


def trajectory_figure(store: Any) -> Figure:
    """Three panels of a trajectory store: the path in its PCA plane (sketch space) coloured by loss, with the
    explained variance on the axes; distance from initialization; and step size, versus step."""
    from lightning_landscape.dynamics.pca import common_projection

    fig = Figure(figsize=(13, 3.8))
    ax_plane, ax_dist, ax_step = fig.subplots(1, 3)
    loss_by_step = dict(
        zip(store.steps.tolist(), store.stats.get("loss", np.full(len(store.steps), np.nan)), strict=True)
    )
    if len(store.sketches) >= 3:
        (coords,), _, _, ratio = common_projection([store.sketches], 2)
        colours = np.asarray([loss_by_step.get(s, np.nan) for s in store.sketch_steps.tolist()])
        ax_plane.plot(coords[:, 0], coords[:, 1], color="0.7", lw=0.6, zorder=1)
        points = ax_plane.scatter(coords[:, 0], coords[:, 1], c=colours, s=6, cmap="viridis", zorder=2)
        ax_plane.scatter(*coords[0], marker="o", s=50, facecolors="none", edgecolors="k", label="start")
        ax_plane.scatter(*coords[-1], marker="*", s=90, color="crimson", label="end")
        ax_plane.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
        ax_plane.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
        ax_plane.legend(fontsize=8)
        fig.colorbar(points, ax=ax_plane, label="training loss")
    ax_plane.set_title("SGD path in its PCA plane (sketch space)")
    ax_dist.plot(store.steps, store.stats.get("distance", np.full(len(store.steps), np.nan)), lw=1.2)
    ax_dist.set_xlabel("optimizer step")
    ax_dist.set_ylabel("|theta_t - theta_0|")
    ax_dist.set_title("distance from initialization")
    ax_step.plot(store.steps, store.stats.get("update_norm", np.full(len(store.steps), np.nan)), lw=0.8)
    ax_step.set_yscale("log")
    ax_step.set_xlabel("optimizer step")
    ax_step.set_ylabel("|theta_t - theta_{t-1}|")
    ax_step.set_title("step size")
    fig.tight_layout()
    return fig


def profile_figure(xs: np.ndarray, losses: np.ndarray, xlabel: str, title: str, note: str = "") -> Figure:
    """A 1-D loss profile (slice along a direction, or an interpolation)."""
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.add_subplot()
    ax.plot(xs, losses, marker="o", ms=3, lw=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (probe set)")
    ax.set_title(title)
    if note:
        ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=8)
    return fig


def contour_figure(
    alphas: np.ndarray,
    betas: np.ndarray,
    losses: np.ndarray,
    xlabel: str = "alpha (direction 1)",
    ylabel: str = "beta (direction 2)",
    title: str = "loss on a 2-D slice",
    path: np.ndarray | None = None,
    path_loss: np.ndarray | None = None,
) -> Figure:
    """Filled contours of a grid ``losses[len(betas), len(alphas)]`` (log-spaced levels), optionally with a
    trajectory ``path`` (T, 2) on top, coloured by its true loss."""
    from matplotlib.colors import LogNorm

    fig = Figure(figsize=(6.0, 4.8))
    ax = fig.add_subplot()
    values = np.asarray(losses, dtype=float)
    low, high = max(values.min(), 1e-8), max(values.max(), 1e-7)
    levels = np.geomspace(low, high, 30) if high / low > 10 else np.linspace(values.min(), values.max(), 30)
    norm = LogNorm(low, high) if high / low > 10 else None
    filled = ax.contourf(alphas, betas, np.clip(values, low, None), levels=levels, norm=norm, cmap="viridis")
    ax.contour(alphas, betas, np.clip(values, low, None), levels=levels[::3], colors="white", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="loss")
    ax.scatter([0], [0], marker="*", s=80, color="crimson", zorder=3, label="center")
    if path is not None:
        ax.plot(path[:, 0], path[:, 1], color="white", lw=1.0, zorder=3)
        ax.scatter(
            path[:, 0],
            path[:, 1],
            c=path_loss,
            cmap="magma",
            s=10,
            zorder=4,
            norm=norm,
            edgecolors="white",
            linewidths=0.3,
            label="trajectory",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def surface_figure(alphas: np.ndarray, betas: np.ndarray, losses: np.ndarray, title: str) -> Any:
    """An interactive 3-D surface (plotly) of a 2-D slice."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Surface(x=alphas, y=betas, z=losses, colorscale="Viridis", colorbar={"title": "loss"}))
    fig.update_layout(title=title, scene={"xaxis_title": "alpha", "yaxis_title": "beta", "zaxis_title": "loss"})
    return fig


def timescales_figure(lags: np.ndarray, timescales: np.ndarray, unit: str = "recorded steps") -> Figure:
    """Implied timescales ``t_k(tau)`` against the lag ``tau`` (log scale); flat lines mean a Markovian model.
    The grey region ``t < tau`` holds processes faster than the lag, which the model cannot resolve."""
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.add_subplot()
    lags = np.asarray(lags, dtype=float)
    for k in range(timescales.shape[1]):
        ax.plot(lags, timescales[:, k], marker="o", ms=4, label=f"t{k + 2}")
    ax.fill_between(lags, np.full_like(lags, 1e-3), lags, color="0.85", label="t < lag")
    ax.set_yscale("log")
    finite = timescales[np.isfinite(timescales) & (timescales > 0)]
    ax.set_ylim(0.5 * min(lags.min(), finite.min() if finite.size else 1), None)
    ax.set_xlabel(f"lag ({unit})")
    ax.set_ylabel(f"implied timescale ({unit})")
    ax.set_title("MSM implied timescales")
    ax.legend(fontsize=8)
    return fig


def paths_figure(paths: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """Loss profiles ``(label, normalized arc length, losses)`` of minimum-energy paths, saddles marked."""
    fig = Figure(figsize=(5.8, 3.9))
    ax = fig.add_subplot()
    for label, arc, losses in paths:
        (line,) = ax.plot(arc, losses, marker="o", ms=3, lw=1.3, label=label)
        top = int(np.argmax(losses))
        ax.plot([arc[top]], [losses[top]], "^", color=line.get_color(), ms=8)
    ax.set_xlabel("normalized arc length along the path")
    ax.set_ylabel("loss (probe set)")
    ax.set_title("minimum-energy paths (triangles: saddles)")
    ax.legend(fontsize=7)
    return fig


def free_energy_figure(
    coords: np.ndarray, free_energy: np.ndarray, points: np.ndarray | None = None, explained: float | None = None
) -> Figure:
    """MSM states at ``coords`` (their 2-D PCA coordinates) coloured by free energy ``-log pi`` (lowest = 0),
    over the sampled ``points`` in grey."""
    fig = Figure(figsize=(6.0, 4.6))
    ax = fig.add_subplot()
    if points is not None:
        ax.scatter(points[:, 0], points[:, 1], s=3, color="0.75", label="sampled points")
    f = np.asarray(free_energy) - np.min(free_energy)
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=f, cmap="viridis_r", s=60, edgecolors="k", label="MSM states")
    fig.colorbar(scatter, ax=ax, label="free energy -log pi (relative)")
    note = f" ({100 * explained:.0f}% of variance)" if explained is not None else ""
    ax.set_xlabel("PC1 of the sketched points" + note)
    ax.set_ylabel("PC2")
    ax.set_title("free energy of the MSM states")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def path_atlas_figure(summary: Mapping[str, Any], points: np.ndarray | None = None) -> Figure:
    """The path atlas of a transition's ``summary``
    (:func:`~lightning_landscape.energy.markov.transition_summary`): metastable sets at their ``positions``
    (2-D), sized by population and coloured by mean loss, with an arrow for every net reactive flux between two sets
    (width by its share of the total), from the ``source_set`` (the initial point's) to the ``target_set`` (the
    current one's); the sampled ``points`` in grey."""
    positions, populations, losses = summary["positions"], summary["populations"], summary["set_losses"]
    flux, source, target = summary["set_flux"], summary["source_set"], summary["target_set"]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    if points is not None:
        ax.scatter(points[:, 0], points[:, 1], s=2, color="0.82")
    total = float(flux[source].sum()) or 1.0
    for i, j in zip(*np.nonzero(flux > 1e-3 * total), strict=True):
        (x0, y0), (x1, y1) = positions[i], positions[j]
        share = float(flux[i, j]) / total
        ax.annotate(
            "", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "-|>", "lw": 0.5 + 4 * share, "color": "C3"}, zorder=2
        )
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{100 * share:.0f}%", fontsize=8, color="C3")
    sizes = 80 + 1500 * np.asarray(populations) / max(float(np.max(populations)), 1e-12)
    scatter = ax.scatter(positions[:, 0], positions[:, 1], s=sizes, c=losses, cmap="viridis", edgecolors="k", zorder=3)
    for k, (x, y) in enumerate(positions):
        label = " (start)" if k == source else " (now)" if k == target else ""
        ax.text(x, y, f"  {k}{label}", fontsize=9, va="center", zorder=4)
    fig.colorbar(scatter, ax=ax, label="mean loss of the set")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title("path atlas: reactive flux from the start to now")
    return fig
