"""Directions in parameter space for slices of the loss landscape.

* :func:`random_direction`: a Gaussian direction ``d``, normalized per filter (Li, Xu, Taylor, Studer &
  Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets", sec. 4): for every parameter tensor
  with an output dimension (weights of linear and conv layers) and each output row/channel ``i``,

      d_i <- d_i / |d_i| * |theta_i|,

  so every filter of the direction has the norm of the corresponding filter of the weights, which removes
  the scale invariance of ReLU networks from the picture. Biases and BatchNorm parameters (1-D tensors)
  are set to zero by default, as in the paper. ``"layer"`` normalizes per tensor, ``"model"`` the whole
  vector to ``|theta|``, ``None`` leaves the raw Gaussian.
* :func:`pca_directions`: the top principal directions of a trajectory ``theta_1..theta_T`` around its
  last point (Li et al., sec. 7), with the variance each explains.

All are seeded; the seed, normalization and ignored parameters go into every saved result.

Example::

    >>> import torch
    >>> from lightning_landscape import ParameterLayout
    >>> net = torch.nn.Linear(3, 2)
    >>> layout = ParameterLayout.from_module(net)
    >>> theta = layout.flatten(dict(net.named_parameters()))
    >>> d = random_direction(layout, theta, seed=0)
    >>> w, dw = theta[:6].view(2, 3), d[:6].view(2, 3)
    >>> torch.allclose(dw.norm(dim=1), w.norm(dim=1)), d[6:].tolist()  # filters normalized, bias ignored
    (True, [0.0, 0.0])
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Normalization = Literal["filter", "layer", "model"] | None


def random_direction(
    layout: Any,
    theta: Tensor,
    seed: int = 0,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
) -> Tensor:
    """A seeded Gaussian direction normalized to ``theta`` (see the module docstring).

    Args:
        layout: the :class:`~lightning_landscape.ParameterLayout` of the parameters.
        theta: the point the direction is normalized to.
        seed: seed of the Gaussian.
        normalization: ``"filter"``, ``"layer"``, ``"model"`` or ``None``.
        ignore_1d: zero the direction on 1-D parameters (biases, BatchNorm weights and biases).
    """
    if normalization not in ("filter", "layer", "model", None):
        raise ValueError(f"`normalization` must be 'filter', 'layer', 'model' or None, got {normalization!r}.")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(theta.numel(), generator=g, dtype=torch.float64).to(theta)
    parts_d = layout.unflatten(d)
    parts_t = layout.unflatten(theta)
    out = []
    for name in layout.names:
        dt, tt = parts_d[name].clone(), parts_t[name]
        if dt.ndim <= 1 and ignore_1d:
            dt.zero_()
        elif normalization == "filter" and dt.ndim >= 2:
            dims = tuple(range(1, dt.ndim))
            norm = torch.linalg.vector_norm
            dt = dt / norm(dt, dim=dims, keepdim=True).clamp_min(1e-12) * norm(tt, dim=dims, keepdim=True)
        elif normalization == "filter" or normalization == "layer":
            dt = dt / dt.norm().clamp_min(1e-12) * tt.norm()
        out.append(dt.reshape(-1))
    d = torch.cat(out)
    if normalization == "model":
        d = d / d.norm().clamp_min(1e-12) * theta.norm()
    return d


def pca_directions(trajectory: Tensor | np.ndarray, n_components: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Principal directions of the rows of ``trajectory`` (T, P) around its last row.

    Returns ``(directions (n, P), explained variance ratio (n,), coordinates (T, n))``; the directions are
    orthonormal, so ``coordinates = (theta_t - theta_T) @ directions.T``.
    """
    theta = torch.as_tensor(np.asarray(trajectory) if not isinstance(trajectory, Tensor) else trajectory)
    theta = theta.double()
    if theta.ndim != 2 or theta.shape[0] < n_components + 1:
        raise ValueError(
            f"`trajectory` must be (T, P) with T > {n_components}, got {tuple(theta.shape)}."
            " HINT: record more snapshots (TrajectoryRecorder(snapshot_every_n_steps=...))."
        )
    centered = theta - theta[-1]
    _, s, vt = torch.linalg.svd(centered, full_matrices=False)
    variance = s**2
    ratio = variance[:n_components] / variance.sum().clamp_min(1e-300)
    directions = vt[:n_components]
    return directions, ratio, centered @ directions.T
