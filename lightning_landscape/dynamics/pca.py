"""PCA of trajectories in sketch space: a streaming estimate, and a common basis for several runs.

For sketches ``y_1, ..., y_T`` (rows, ``k`` columns) of a trajectory, the principal directions are the
eigenvectors of the covariance ``C = (1/T) sum_t (y_t - m)(y_t - m)^T``. :class:`StreamingPCA` keeps
``m`` and ``C`` with Welford's update (``O(k^2)`` memory, no stored rows), so the explained variance of
the leading directions is known at every step. Because the sketch is a near-isometry (sparse JL), the
spectrum of ``C`` approximates that of the trajectory's covariance in parameter space.

:func:`common_projection` fits one basis to several trajectories at once (different seeds, replicas) and
projects each onto it, the common frame in which their paths and basins can be compared.

Example::

    >>> import numpy as np
    >>> pca = StreamingPCA(k=3)
    >>> for t in range(100):
    ...     pca.update(np.array([t, 0.1 * np.sin(t), 0.0]))
    >>> round(float(pca.explained_variance_ratio(1)[0]), 3)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class StreamingPCA:
    """Running mean and covariance of ``k``-dimensional rows (Welford), and their principal directions."""

    def __init__(self, k: int) -> None:
        self.k, self.n = k, 0
        self.mean = np.zeros(k)
        self.m2 = np.zeros((k, k))

    def update(self, y: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.k)
        for row in y:
            self.n += 1
            delta = row - self.mean
            self.mean += delta / self.n
            self.m2 += np.outer(delta, row - self.mean)

    @property
    def covariance(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)

    def components(self, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """The top principal directions (rows) and their variances."""
        values, vectors = np.linalg.eigh(self.covariance)
        order = np.argsort(values)[::-1][:n_components]
        return vectors[:, order].T, values[order]

    def explained_variance_ratio(self, n_components: int = 2) -> np.ndarray:
        total = float(np.trace(self.covariance))
        _, values = self.components(n_components)
        return values / total if total > 0 else np.zeros_like(values)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StreamingPCA:
        pca = cls(state["k"])
        pca.n, pca.mean, pca.m2 = state["n"], np.asarray(state["mean"]), np.asarray(state["m2"])
        return pca


def common_projection(
    trajectories: Sequence[np.ndarray], n_components: int = 2
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Project several sketch trajectories onto the PCA basis of all their rows together.

    Returns ``(coordinates per trajectory, components (n, k), mean (k,), explained variance ratio (n,))``.
    """
    if not trajectories:
        raise ValueError("`trajectories` is empty. HINT: pass the `sketches` of one or more TrajectoryStores.")
    widths = {t.shape[1] for t in trajectories}
    if len(widths) != 1:
        raise ValueError(f"the trajectories have different sketch sizes {sorted(widths)}; they are not comparable.")
    rows = np.concatenate(trajectories).astype(np.float64)
    mean = rows.mean(0)
    _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
    variance = s**2
    components = vt[:n_components]
    ratio = variance[:n_components] / variance.sum() if variance.sum() > 0 else np.zeros(n_components)
    return [(t - mean) @ components.T for t in trajectories], components, mean, ratio
