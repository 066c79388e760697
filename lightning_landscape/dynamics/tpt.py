"""Transition path theory on a Markov state model: how, and how fast, the chain goes from a set A to a set B.

For a reversible transition matrix ``T`` (at lag ``tau``) with stationary distribution ``pi`` and disjoint state sets
``A`` (source) and ``B`` (target) (E & Vanden-Eijnden 2006; Metzner, Schuette & Vanden-Eijnden 2009; Noe et al.
2009):

* forward committor ``q+_i``: the probability of reaching ``B`` before ``A`` from ``i`` (0 on ``A``, 1 on ``B``,
  ``q+ = T q+`` elsewhere); for a reversible chain the backward committor is ``q- = 1 - q+``;
* reactive flux ``f_ij = pi_i q-_i T_ij q+_j`` (``i != j``) and net flux ``f+_ij = max(0, f_ij - f_ji)``; the total
  flux ``F`` out of ``A``; the rate ``k_AB = F / sum_i pi_i q-_i`` (per lag), and the mean first-passage time
  ``1 / k_AB`` (in lags), both multiplied into steps by ``step`` (optimizer or replica steps per lag);
* the dominant pathways: the net flux decomposed into ``A -> B`` paths by repeatedly removing the path of the largest
  bottleneck flux (deeptime's ``ReactiveFlux.pathways``), each with its share of ``F``.

deeptime computes them; this module picks the sets and reports the shares, rates and committors.

Example (a 4-state chain A=0 -> {1 or 2} -> B=3; the upper channel carries twice the flux)::

    >>> import numpy as np
    >>> T = np.array([[0.7, 0.2, 0.1, 0.0], [0.2, 0.6, 0.0, 0.2], [0.1, 0.0, 0.8, 0.1], [0.0, 0.2, 0.1, 0.7]])
    >>> paths = transition_paths(T, [0], [3])
    >>> [(p, round(s, 2)) for p, s in zip(paths.pathways, paths.shares)]
    [([0, 1, 3], 0.67), ([0, 2, 3], 0.33)]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class TransitionPaths:
    """Reactive flux from ``source`` to ``target`` (state indices of the MSM's active set)."""

    source: list[int]
    target: list[int]
    forward_committor: np.ndarray  # (n,) q+
    backward_committor: np.ndarray  # (n,) q-
    net_flux: np.ndarray  # (n, n)
    total_flux: float  # F, per lag
    rate: float  # k_AB, per step
    mfpt: float  # 1 / k_AB, in steps
    pathways: list[list[int]]  # A -> B state sequences, largest flux first
    shares: list[float]  # each pathway's share of the total flux
    sets: tuple[int, int] | None = None  # the metastable sets whose cores are source and target, when known


def transition_paths(
    transition_matrix: np.ndarray,
    source: Sequence[int],
    target: Sequence[int],
    stationary_distribution: np.ndarray | None = None,
    step: float = 1.0,
    fraction: float = 0.99,
    max_pathways: int = 20,
) -> TransitionPaths:
    """Committors, reactive flux, rate, mean first-passage time and dominant pathways from ``source`` to ``target``.

    Args:
        transition_matrix: a reversible row-stochastic ``(n, n)`` matrix (an MSM's, on its active set).
        source, target: disjoint, non-empty sets of state indices.
        stationary_distribution: ``pi`` (default: computed by deeptime).
        step: steps per lag, to give the rate per step and the MFPT in steps (e.g. ``lag * record_every``).
        fraction: decompose the flux into pathways until they carry this fraction of it, or
        max_pathways: until there are this many (each costs a search over the whole network; on a fine
            discretization thousands of small pathways may be needed to reach ``fraction``).

    Raises:
        ValueError: for empty or overlapping sets, or indices outside the matrix.
    """
    from deeptime.markov import reactive_flux

    n = len(transition_matrix)
    a, b = sorted({int(i) for i in source}), sorted({int(i) for i in target})
    if not a or not b or set(a) & set(b) or min(a + b) < 0 or max(a + b) >= n:
        raise ValueError(
            f"`source` {a} and `target` {b} must be disjoint, non-empty sets of states in [0, {n}). HINT: the"
            " metastable set of the initial point and that of the current one, when they differ."
        )
    flux = reactive_flux(transition_matrix, a, b, stationary_distribution=stationary_distribution)
    with warnings.catch_warnings():  # "Maximum number of iterations reached": max_pathways, by design
        warnings.filterwarnings("ignore", "Maximum number of iterations", RuntimeWarning)
        pathways, capacities = flux.pathways(fraction=fraction, maxiter=max_pathways)
    total = float(flux.total_flux)
    order = np.argsort(capacities)[::-1]
    return TransitionPaths(
        source=a,
        target=b,
        forward_committor=np.asarray(flux.forward_committor),
        backward_committor=np.asarray(flux.backward_committor),
        net_flux=np.asarray(flux.net_flux),
        total_flux=total,
        rate=float(flux.rate) / step,
        mfpt=float(flux.mfpt) * step,
        pathways=[[int(s) for s in pathways[k]] for k in order],
        shares=[float(capacities[k]) / total if total > 0 else 0.0 for k in order],
    )
