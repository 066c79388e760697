"""Sharpness measures of the generalization literature, on any objective.

With ``L`` the objective and ``w = theta`` the current point:

* **epsilon-sharpness** (Keskar et al. 2017, "On Large-Batch Training ... Sharp Minima", eq. 4):
  ``100 * (max_{z in C_eps} L(w + z) - L(w)) / (1 + L(w))`` over the box
  ``C_eps = {z : |z_i| <= eps (|w_i| + 1)}``, maximized with L-BFGS-B as in the paper (full space).
* **adaptive sharpness** (Kwon et al. 2021, ASAM; Andriushchenko et al. 2023, "A Modern Look at the
  Relationship between Sharpness and Generalization"): perturbations scaled elementwise by
  ``T_w = |w| + eta``, which makes the measure invariant to the ReLU / BatchNorm rescalings that leave the
  network function unchanged (for ``eta = 0``).
  Worst case: ``max_{||T_w^{-1} delta||_p <= rho} L(w + delta) - L(w)``, by projected (normalized or
  sign) gradient ascent in the scaled coordinates ``u = T_w^{-1} delta`` with linearly decaying steps (a
  simpler stand-in for the Auto-PGD of Andriushchenko et al.; a lower bound of the maximum).
  Average case: ``E_{xi ~ N(0, I)} L(w + rho T_w xi) - L(w)``.
* **SAM sharpness** (Foret et al. 2021): the one-step ascent ``L(w + rho g / |g|) - L(w)``.
* **PAC-Bayes flatness** (Jiang et al. 2020, "Fantastic Generalization Measures", sigma of eq. 47): the
  largest ``sigma`` with ``E_{u ~ N(0, sigma^2 I)} L(w + u) - L(w) <= threshold``, by bisection on
  ``log sigma`` with common random numbers. ``sigma`` is a standard deviation.

Epsilon-sharpness and SAM sharpness change under a rescaling of ReLU layers; the adaptive measures do not.

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> A = torch.diag(torch.tensor([2.0, 4.0]))
    >>> quad = Objective(torch.nn.Linear(2, 1, bias=False), [A],
    ...                  loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]))
    >>> theta = torch.zeros(2)
    >>> s = epsilon_sharpness(quad, epsilon=0.1, theta=theta)  # max at a vertex: 0.5 * (2 + 4) * 0.1^2
    >>> round(s.perturbed_loss, 5), round(s.value, 3)
    (0.03, 3.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from lightning_landscape.objective import Energy


@dataclass
class SharpnessResult:
    """The measure's ``value``, the loss at ``w`` and at the perturbation found, and the evaluations used."""

    value: float
    loss: float
    perturbed_loss: float
    n_evals: int
    extra: dict[str, float] = field(default_factory=dict)


def _point(objective: Energy, theta: Tensor | None) -> Tensor:
    return (objective.theta0 if theta is None else theta).detach().to(objective.dtype)


def epsilon_sharpness(
    objective: Energy, epsilon: float = 1e-3, *, theta: Tensor | None = None, max_iter: int = 10, seed: int = 0
) -> SharpnessResult:
    """Keskar et al.'s epsilon-sharpness (in percent) by L-BFGS-B over the box, from a random start in it."""
    if epsilon <= 0:
        raise ValueError(f"`epsilon` must be positive, got {epsilon}.")
    w = _point(objective, theta)
    base = float(objective.loss(w))
    bound = (epsilon * (w.abs() + 1)).double().cpu().numpy()
    rng = np.random.default_rng(seed)
    z0 = rng.uniform(-0.5, 0.5, size=w.numel()) * bound
    evals = 0

    def negative(z: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evals
        evals += 1
        point = w + torch.from_numpy(z).to(w)
        return -float(objective.loss(point)), -objective.grad(point).double().cpu().numpy()

    res = minimize(
        negative,
        z0,
        jac=True,
        method="L-BFGS-B",
        bounds=list(zip(-bound, bound, strict=True)),
        options={"maxiter": max_iter},
    )
    worst = max(-float(res.fun), base)
    return SharpnessResult(100 * (worst - base) / (1 + base), base, worst, evals)


def adaptive_sharpness(
    objective: Energy,
    rho: float = 0.05,
    kind: Literal["worst", "average"] = "worst",
    *,
    p: float = 2,
    eta: float = 0.0,
    n_steps: int = 10,
    n_samples: int = 32,
    theta: Tensor | None = None,
    seed: int = 0,
) -> SharpnessResult:
    """Worst-case (projected gradient ascent, ``n_steps``) or average-case (``n_samples``) adaptive sharpness.

    ``p`` is 2 or ``inf`` (the norm of the scaled perturbation, worst case only); ``eta`` is ASAM's offset.
    """
    if rho <= 0:
        raise ValueError(f"`rho` must be positive, got {rho}.")
    if kind not in ("worst", "average"):
        raise ValueError(f"`kind` must be 'worst' or 'average', got {kind!r}.")
    if p not in (2, math.inf):
        raise ValueError(f"`p` must be 2 or math.inf, got {p}.")
    w = _point(objective, theta)
    base = float(objective.loss(w))
    scale = w.abs() + eta
    g = torch.Generator().manual_seed(seed)
    if kind == "average":
        xi = torch.randn(n_samples, w.numel(), generator=g, dtype=torch.float64).to(w)
        losses = objective.losses(w + rho * scale * xi)
        err = float(losses.std()) / math.sqrt(n_samples) if n_samples > 1 else float("inf")
        return SharpnessResult(float(losses.mean()) - base, base, float(losses.mean()), n_samples, {"std_error": err})
    u = torch.randn(w.numel(), generator=g, dtype=torch.float64).to(w)  # random start: the gradient may vanish
    u = _project(0.5 * rho * u / u.norm() if p == 2 else 0.5 * rho * u.sign(), rho, p)
    best = base
    for t in range(n_steps):
        step = rho * (1.0 - t / n_steps)  # linearly decaying steps settle on the boundary maximum
        grad_u = scale * objective.grad(w + scale * u)
        if p == 2:
            u = _project(u + step * grad_u / grad_u.norm().clamp_min(1e-30), rho, p)
        else:
            u = _project(u + step * grad_u.sign(), rho, p)
        best = max(best, float(objective.loss(w + scale * u)))
    return SharpnessResult(best - base, base, best, 2 * n_steps)


def _project(u: Tensor, rho: float, p: float) -> Tensor:
    if p == 2:
        norm = u.norm()
        return u * (rho / norm) if norm > rho else u
    return u.clamp(-rho, rho)


def sam_sharpness(objective: Energy, rho: float = 0.05, *, theta: Tensor | None = None) -> SharpnessResult:
    """``L(w + rho g/|g|) - L(w)``: the sharpness SAM minimizes, from one gradient step."""
    w = _point(objective, theta)
    base = float(objective.loss(w))
    grad = objective.grad(w)
    perturbed = float(objective.loss(w + rho * grad / grad.norm().clamp_min(1e-30)))
    return SharpnessResult(perturbed - base, base, perturbed, 2)


def pac_bayes_sigma(
    objective: Energy,
    threshold: float = 0.1,
    *,
    n_samples: int = 16,
    max_iter: int = 20,
    sigma_range: tuple[float, float] = (1e-6, 10.0),
    theta: Tensor | None = None,
    seed: int = 0,
) -> SharpnessResult:
    """Largest ``sigma`` whose isotropic Gaussian perturbation raises the mean loss by at most ``threshold``.

    ``value`` is sigma (larger = flatter); ``extra["gap"]`` the mean loss increase at that sigma.
    """
    if threshold <= 0:
        raise ValueError(f"`threshold` must be positive, got {threshold}.")
    w = _point(objective, theta)
    base = float(objective.loss(w))
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(n_samples, w.numel(), generator=g, dtype=torch.float64).to(w)
    evals = 0

    def gap(sigma: float) -> float:
        nonlocal evals
        evals += n_samples
        return float(objective.losses(w + sigma * xi).mean()) - base

    lo, hi = math.log(sigma_range[0]), math.log(sigma_range[1])
    if gap(math.exp(hi)) <= threshold:
        sigma = math.exp(hi)
    else:
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            if gap(math.exp(mid)) <= threshold:
                lo = mid
            else:
                hi = mid
        sigma = math.exp(lo)
    at_sigma = gap(sigma)
    return SharpnessResult(sigma, base, base + at_sigma, evals, {"gap": at_sigma, "threshold": threshold})
