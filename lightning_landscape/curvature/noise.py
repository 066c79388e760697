"""Gradient noise of SGD, its temperature, and the edge-of-stability ratio.

With per-sample gradients ``g_i`` (i = 1..n) on the probe set and their mean ``g``:

* gradient noise covariance trace ``tr(Sigma) = (1/(n-1)) sum_i |g_i - g|^2``;
* simple noise scale ``B_simple = tr(Sigma) / |g|^2`` (McCandlish et al. 2018, "An Empirical Model of
  Large-Batch Training"): the batch size at which SGD noise and signal are comparable;
* SGD temperature ``T = lr tr(Sigma) / (2 B d)`` (Li, Tai & E 2017/2019: SGD with learning rate ``lr`` and
  batch ``B`` is a weak first-order approximation of an SDE whose noise per coordinate is ``T``; ``d`` is
  the number of parameters);
* edge of stability (Cohen et al. 2021): gradient descent on a quadratic is stable iff
  ``lambda_max < 2 / lr``, and heavy-ball momentum ``beta`` raises the limit to ``(2 + 2 beta) / lr``; the
  ratio ``lr lambda_max / (2 + 2 beta)`` is 1 at the limit.

Example::

    >>> round(edge_of_stability_ratio(lambda_max=10.0, lr=0.1), 3), round(edge_of_stability_ratio(10.0, 0.1, 0.9), 3)
    (0.5, 0.263)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from lightning_landscape.objective import batch_size_of, map_tensors


@dataclass
class GradientMoments:
    """Sums over per-sample gradients: ``sum_i g_i`` (P,), ``sum_i |g_i|^2`` and ``n`` (add them across ranks)."""

    grad_sum: Tensor
    sq_norm_sum: Tensor
    n: int


@dataclass
class GradientNoise:
    """``tr(Sigma)``, ``|g|^2``, ``B_simple`` and (with a learning rate and batch size) the SGD temperature."""

    trace_cov: float
    grad_norm_sq: float
    b_simple: float
    n_samples: int
    temperature: float | None = None


def gradient_moments(objective: Any, theta: Tensor | None = None, chunk_size: int = 64) -> GradientMoments:
    """Per-sample gradient sums of an :class:`~lightning_landscape.Objective` over its probe set.

    Each sample is evaluated as a batch of one (``torch.func.vmap`` over the samples of each batch, in
    chunks; a loop if the loss cannot be vmapped). BatchNorm in ``"train"`` mode makes per-sample gradients
    ill-defined, so the objective must use ``bn_mode="eval"`` when it has BatchNorm layers.
    """
    theta = (objective.theta0 if theta is None else theta).detach().to(objective.dtype)
    if objective.bn_mode == "train" and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in objective.module.modules()
    ):
        raise ValueError("Per-sample gradients need `bn_mode='eval'` for a module with BatchNorm layers.")

    def sample_loss(t: Tensor, sample: Any) -> Tensor:
        one = map_tensors(sample, lambda x: x.unsqueeze(0))
        return objective.call(objective.tensors(t), one, 0)

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0), chunk_size=chunk_size)
    grad_sum = torch.zeros_like(theta)
    sq = torch.zeros((), dtype=theta.dtype, device=theta.device)
    n = 0
    with objective.evaluation_mode():
        for batch in objective.batches:
            size = batch_size_of(batch)
            try:
                grads = per_sample_grad(theta, batch)
            except Exception:  # not vmappable: one sample at a time
                grads = torch.stack(
                    [grad(sample_loss)(theta, map_tensors(batch, lambda x, i=i: x[i])) for i in range(size)]
                )
            grad_sum += grads.sum(0)
            sq += (grads**2).sum()
            n += size
    return GradientMoments(grad_sum, sq, n)


def gradient_noise(moments: GradientMoments, lr: float | None = None, batch_size: int | None = None) -> GradientNoise:
    """``tr(Sigma)``, ``B_simple`` and the temperature ``lr tr(Sigma) / (2 B d)`` from per-sample moments."""
    n = moments.n
    if n < 2:
        raise ValueError(f"Gradient noise needs at least 2 samples, got {n}.")
    mean = moments.grad_sum / n
    mean_sq = float(mean.pow(2).sum())
    trace_cov = (float(moments.sq_norm_sum) - n * mean_sq) / (n - 1)
    b_simple = trace_cov / mean_sq if mean_sq > 0 else float("inf")
    temperature = None
    if lr is not None and batch_size:
        temperature = lr * trace_cov / (2 * batch_size * mean.numel())
    return GradientNoise(trace_cov, mean_sq, b_simple, n, temperature)


def gradient_norm(grads: list[Tensor]) -> Tensor | float:
    """``|g|`` over a list of gradients, dense (one fused ``_foreach_norm``) or sparse (``nn.Embedding(sparse=True)``:
    the norm of the coalesced values). A 0-d tensor, so that the caller pays no device synchronization."""
    if not grads:
        return 0.0
    dense = [g for g in grads if g.layout == torch.strided]
    norms = list(torch._foreach_norm(dense)) if dense else []
    norms += [g.coalesce().values().norm() for g in grads if g.layout != torch.strided]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))


def two_batch_noise(
    mean_local_sq: float, global_sq: float, mean_inverse_size: float, world: int
) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from data-parallel gradients (McCandlish et al. 2018, appendix A).

    Each of ``W`` ranks computes the mean gradient ``g_r`` of its ``b_r`` samples, and DDP averages them,
    ``g = mean_r g_r``. With ``S = mean_r |g_r|^2`` (``mean_local_sq``), ``|g|^2`` (``global_sq``) and
    ``a = mean_r 1/b_r`` (``mean_inverse_size``), for independent samples

        E S = |G|^2 + a tr(Sigma),        E |g|^2 = |G|^2 + (a / W) tr(Sigma),

    so ``tr(Sigma) = (S - |g|^2) / (a (1 - 1/W))`` and ``|G|^2 = |g|^2 - (a / W) tr(Sigma)``. With equal batches
    ``b`` this is the paper's pair of batch sizes ``b`` and ``W b``; the real sizes keep it unbiased at an epoch's
    last, smaller batch.

    Example::

        >>> g2, trace = two_batch_noise(mean_local_sq=1.5, global_sq=1.25, mean_inverse_size=0.5, world=2)
        >>> round(g2, 6), round(trace, 6)
        (1.0, 1.0)
    """
    if world < 2 or not mean_inverse_size > 0:
        raise ValueError(f"two_batch_noise needs at least 2 ranks with samples, got world={world}.")
    trace = (mean_local_sq - global_sq) / (mean_inverse_size * (1 - 1 / world))
    return global_sq - mean_inverse_size / world * trace, trace


def stability_limit(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The curvature ``lambda`` above which ``torch.optim.SGD`` diverges on a quadratic ``lambda x^2 / 2``.

    With ``a = lr lambda`` and ``u = lr v``, one step of heavy ball (``v <- beta v + (1 - tau) g``,
    ``x <- x - lr v``) is the linear map ``[[1 - (1 - tau) a, -beta], [(1 - tau) a, beta]]`` on ``(x, u)``, and of
    Nesterov (``x <- x - lr (g + beta v)``) ``[[1 - a (1 + beta (1 - tau)), -beta^2], [(1 - tau) a, beta]]``. For
    ``0 <= beta < 1`` an eigenvalue leaves the unit disk through -1, where ``det(M + I) = 0``:

        heavy ball: lambda* = 2 (1 + beta) / (lr (1 - tau)),
        Nesterov:   lambda* = 2 (1 + beta) / (lr (1 + beta (2 - tau))),

    which for ``beta = tau = 0`` is the ``2 / lr`` of gradient descent (Cohen et al. 2021).

    Example::

        >>> stability_limit(0.1), round(stability_limit(0.1, momentum=0.9), 6)
        (20.0, 38.0)
    """
    if nesterov:
        return 2 * (1 + momentum) / (lr * (1 + momentum * (2 - dampening)))
    return 2 * (1 + momentum) / (lr * (1 - dampening)) if dampening < 1 else math.inf


def edge_of_stability_ratio(
    lambda_max: float, lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """``lambda_max`` over the :func:`stability_limit` of SGD with these settings: 1 at the edge of stability."""
    return lambda_max / stability_limit(lr, momentum, dampening, nesterov)
