"""Minimum-energy paths between two minima: the simplified string method and climbing-image NEB.

A minimum-energy path (MEP) from ``theta_a`` to ``theta_b`` is a curve along which the gradient is parallel
to the tangent; its highest point is a first-order saddle, and ``L(saddle) - L(theta_a)`` is the barrier
that a noisy optimizer has to cross. Linear interpolation only bounds it from above.

* **String method** (E, Ren & Vanden-Eijnden 2007, "Simplified and improved string method"): images
  ``phi_i`` descend the gradient, ``phi_i <- phi_i - dt grad L(phi_i)``, and are then redistributed to
  equal arc length along the polyline through them; the ends stay fixed.
* **Nudged elastic band** (Henkelman, Uberuaga & Jonsson 2000): each image moves with the force
  ``-grad L`` perpendicular to the tangent plus a spring force ``k (|phi_{i+1} - phi_i| - |phi_i - phi_{i-1}|)``
  along it (upwinded tangents of Henkelman & Jonsson 2000).
* **Climbing image**: after the path has settled, the highest image moves with ``-grad L + 2 (grad L . tau) tau``,
  uphill along the path and downhill across it, and converges to the saddle itself.

Intermediate minima (interior local minima of the path's energy profile) are quenched by gradient descent.

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> well = Objective(torch.nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)],
    ...     loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2 + 2 * m.weight[0, 1] ** 2, dtype=torch.float64)
    >>> a, b = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> path = minimum_energy_path(well, a, b, n_images=11, step_size=0.05)
    >>> round(path.saddle_loss, 4), round(path.barrier_forward, 4)
    (1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor


@dataclass
class PathResult:
    """A minimum-energy path and what it says about the landscape between its ends."""

    images: Tensor  # (n, P)
    losses: np.ndarray  # (n,)
    arc: np.ndarray  # normalized arc length of each image, 0 .. 1
    saddle_index: int
    saddle: Tensor
    saddle_loss: float
    barrier_forward: float  # L(saddle) - L(theta_a)
    barrier_backward: float  # L(saddle) - L(theta_b)
    length: float
    intermediate_minima: list[tuple[Tensor, float]] = field(default_factory=list)
    n_grad: int = 0
    converged: bool = False
    method: str = "string"


def _losses(objective: Any, images: Tensor) -> Tensor:
    if hasattr(objective, "losses"):
        return objective.losses(images).to(images)
    return torch.stack([objective.loss(x) for x in images])


def _grads(objective: Any, images: Tensor) -> Tensor:
    if hasattr(objective, "grads"):  # all images at once (Objective.grads batches them with vmap when faster)
        return objective.grads(images).to(images)
    return torch.stack([objective.grad(x) for x in images])


def _redistribute(images: Tensor) -> Tensor:
    """Points at equal arc length along the polyline through ``images`` (ends kept)."""
    seg = (images[1:] - images[:-1]).norm(dim=1)
    s = torch.cat([seg.new_zeros(1), seg.cumsum(0)])
    if float(s[-1]) == 0:
        return images
    s = s / s[-1]
    targets = torch.linspace(0, 1, len(images), dtype=s.dtype, device=s.device)
    idx = torch.searchsorted(s, targets).clamp(1, len(images) - 1)
    lo, hi = s[idx - 1], s[idx]
    w = ((targets - lo) / (hi - lo).clamp_min(1e-30)).unsqueeze(1)
    out = images[idx - 1] + w * (images[idx] - images[idx - 1])
    out[0], out[-1] = images[0], images[-1]
    return out


def _tangents(images: Tensor, energies: Tensor) -> Tensor:
    """Upwinded tangents (Henkelman & Jonsson 2000), unit length, for the interior images."""
    tau = torch.zeros_like(images)
    for i in range(1, len(images) - 1):
        forward, backward = images[i + 1] - images[i], images[i] - images[i - 1]
        e_prev, e, e_next = float(energies[i - 1]), float(energies[i]), float(energies[i + 1])
        if e_next > e > e_prev:
            t = forward
        elif e_next < e < e_prev:
            t = backward
        else:
            dmax, dmin = max(abs(e_next - e), abs(e_prev - e)), min(abs(e_next - e), abs(e_prev - e))
            t = forward * dmax + backward * dmin if e_next > e_prev else forward * dmin + backward * dmax
        tau[i] = t / t.norm().clamp_min(1e-30)
    return tau


def _quench(objective: Any, theta: Tensor, step_size: float, n_steps: int) -> tuple[Tensor, int]:
    for _ in range(n_steps):
        theta = theta - step_size * objective.grad(theta)
    return theta, n_steps


def minimum_energy_path(
    objective: Any,
    theta_a: Tensor,
    theta_b: Tensor,
    n_images: int = 15,
    method: Literal["string", "neb"] = "string",
    climbing: bool = True,
    *,
    step_size: float = 1e-2,
    n_steps: int = 2000,
    tol: float = 1e-6,
    spring: float = 1.0,
    quench_steps: int = 500,
) -> PathResult:
    """The minimum-energy path from ``theta_a`` to ``theta_b`` (both should be minima).

    Args:
        objective: an :class:`~lightning_landscape.Objective` (its ``loss`` and ``grad`` are used).
        theta_a, theta_b: the two ends (kept fixed).
        n_images: images on the path, ends included.
        method: ``"string"`` or ``"neb"``.
        climbing: refine the highest image to the saddle, once the path has converged (``tol``); the
            highest image of an unconverged path is an upper bound of the barrier along it.
        step_size: gradient step of the images (a learning rate: scale it to the curvature).
        n_steps: iterations for the path, and again for the climbing image.
        tol: stop when the largest image displacement per step, divided by ``step_size``, is below it.
        spring: NEB spring constant.
        quench_steps: gradient steps that refine each intermediate minimum.
    """
    if n_images < 3:
        raise ValueError(f"`n_images` must be at least 3, got {n_images}.")
    if method not in ("string", "neb"):
        raise ValueError(f"`method` must be 'string' or 'neb', got {method!r}.")
    dtype = objective.dtype
    a, b = theta_a.detach().to(dtype), theta_b.detach().to(dtype)
    ts = torch.linspace(0, 1, n_images, dtype=dtype).unsqueeze(1)
    images = a + ts * (b - a)
    n_grad, converged = 0, False
    for _ in range(n_steps):
        grads = _grads(objective, images[1:-1])
        n_grad += n_images - 2
        if method == "string":
            moved = images.clone()
            moved[1:-1] = images[1:-1] - step_size * grads
            new = _redistribute(moved)
        else:
            energies = _losses(objective, images)
            tau = _tangents(images, energies)[1:-1]
            perp = grads - (grads * tau).sum(1, keepdim=True) * tau
            dist = (images[1:] - images[:-1]).norm(dim=1)
            spring_force = spring * (dist[1:] - dist[:-1]).unsqueeze(1) * tau
            new = images.clone()
            new[1:-1] = images[1:-1] + step_size * (-perp + spring_force)
        shift = float((new - images).norm(dim=1).max()) / step_size
        images = new
        if shift < tol:
            converged = True
            break
    losses = _losses(objective, images)
    top = int(torch.argmax(losses[1:-1])) + 1
    if climbing and converged:  # on an unrelaxed path the climb can leave the path and overshoot
        saddle = images[top].clone()
        for _ in range(n_steps):
            energies = torch.stack([losses[top - 1], objective.loss(saddle), losses[top + 1]])
            local = torch.stack([images[top - 1], saddle, images[top + 1]])
            tau = _tangents(local, energies)[1]
            grad = objective.grad(saddle)
            n_grad += 1
            step = step_size * (grad - 2 * torch.dot(grad, tau) * tau)
            saddle = saddle - step
            if float(step.norm()) / step_size < tol:
                break
        images[top] = saddle
        losses[top] = objective.loss(saddle)
    values = losses.double().cpu().numpy()
    seg = (images[1:] - images[:-1]).norm(dim=1).double().cpu().numpy()
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    minima = []
    for i in range(1, n_images - 1):
        if values[i] < values[i - 1] and values[i] < values[i + 1]:
            theta, used = _quench(objective, images[i], step_size, quench_steps)
            n_grad += used
            minima.append((theta, float(objective.loss(theta))))
    saddle_loss = float(values[top])
    return PathResult(
        images=images,
        losses=values,
        arc=arc / arc[-1] if arc[-1] > 0 else arc,
        saddle_index=top,
        saddle=images[top].clone(),
        saddle_loss=saddle_loss,
        barrier_forward=saddle_loss - float(values[0]),
        barrier_backward=saddle_loss - float(values[-1]),
        length=float(arc[-1]),
        intermediate_minima=minima,
        n_grad=n_grad,
        converged=converged,
        method=method,
    )
