"""Minimum-energy paths between two minima: the simplified string method and climbing-image NEB.

A minimum-energy path (MEP) from ``theta_a`` to ``theta_b`` is a curve along which the gradient is parallel
to the tangent; its highest point is a first-order saddle, and ``L(saddle) - L(theta_a)`` is the barrier
that a noisy optimizer has to cross. Linear interpolation only bounds it from above.

* **String method** (E, Ren & Vanden-Eijnden 2007, "Simplified and improved string method"): images
  ``phi_i`` descend the gradient perpendicular to the path and are then redistributed to equal arc length along
  the polyline through them; the ends stay fixed.
* **Nudged elastic band** (Henkelman, Uberuaga & Jonsson 2000): each image moves with the force
  ``-grad L`` perpendicular to the tangent plus a spring force ``k (|phi_{i+1} - phi_i| - |phi_i - phi_{i-1}|)``
  along it (upwinded tangents of Henkelman & Jonsson 2000).
* **Climbing image**: after the path has settled, the highest image moves with ``-grad L + 2 (grad L . tau) tau``,
  uphill along the path and downhill across it, and converges to the saddle itself.

The images move by FIRE (Bitzek et al. 2006), with a first step from the curvature at the ends, so the defaults
work across scales (the Mueller-Brown potential, curvature ~1e3, and networks, curvature ~1). Intermediate minima
(interior local minima of the path's energy profile) are quenched by FIRE too.

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> well = Objective(torch.nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)],
    ...     loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2 + 2 * m.weight[0, 1] ** 2, dtype=torch.float64)
    >>> a, b = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> path = minimum_energy_path(well, a, b, n_images=11)
    >>> path.converged, round(path.saddle_loss, 4), round(path.barrier_forward, 4)
    (True, 1.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_landscape.objective import Energy


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
    force_ratio: float = float("nan")  # largest perpendicular force over the gradient scale (converged: <= tol)
    criterion: str = ""  # what it converged on: "force", "energy", or "" (not converged)


def dips(losses: np.ndarray, depth: float = 0.0) -> list[int]:
    """Indices of the inner images that are strict local minima of the loss along a path and lie more than
    ``depth`` below the highest loss on either side of them (``depth=0``: every strict local minimum)."""
    return [
        k
        for k in range(1, len(losses) - 1)
        if losses[k] < losses[k - 1]
        and losses[k] < losses[k + 1]
        and min(losses[:k].max(), losses[k + 1 :].max()) - losses[k] > depth
    ]


def _losses(objective: Energy, images: Tensor) -> Tensor:
    if hasattr(objective, "losses"):
        return objective.losses(images).to(images)
    return torch.stack([objective.loss(x) for x in images])


def _grads(objective: Energy, images: Tensor) -> Tensor:
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


def _curvature(objective: Energy, ends: tuple[Tensor, Tensor]) -> float:
    """The largest Hessian eigenvalue at the ends, from a few Lanczos products (1e4 without Hessian-vector products,
    which makes the derived step small and the springs stiff: safe, if slow)."""
    if not hasattr(objective, "hvp"):
        return 1e4
    from lightning_landscape.curvature import hessian_eigenvalues

    def largest(end: Tensor) -> float:
        if end.numel() < 3:  # too small for Lanczos: the dense Hessian from P products
            eye = torch.eye(end.numel(), dtype=end.dtype, device=end.device)
            dense = torch.stack([objective.hvp(end, e) for e in eye])
            return float(torch.linalg.eigvalsh(0.5 * (dense + dense.T)).abs().max())
        return abs(float(hessian_eigenvalues(objective, k=1, theta=end, tol=1e-2, max_iter=20).eigenvalues[0]))

    return max(max(largest(end) for end in ends), 1e-12)


class _Fire:
    """FIRE (Bitzek, Koskinen, Gaehler, Moseler & Gumbsch 2006, "Structural relaxation made simple"): damped dynamics
    whose velocity is turned toward the force while the power ``F . v`` stays positive, and reset when it turns
    negative; the time step grows while things go well (up to ``10 dt0``) and halves when not. No point moves more
    than ``max_move`` per step (ASE's ``maxstep``; here half the spacing of the path's images), so one step into a
    region of huge gradients cannot throw the path away. It needs no tuning beyond a stable first step, and is the
    usual optimizer of NEB (ASE, LAMMPS)."""

    def __init__(self, dt: float, max_move: float) -> None:
        self.dt0 = self.dt = dt
        self.max_move = max_move
        self.alpha, self.positive, self.v = 0.1, 0, None

    def step(self, force: Tensor) -> Tensor:
        """The displacement for ``force`` (and the velocity update)."""
        if self.v is None:
            self.v = torch.zeros_like(force)
        if float((force * self.v).sum()) > 0:
            self.v = (1 - self.alpha) * self.v + self.alpha * self.v.norm() * force / force.norm().clamp_min(1e-300)
            self.positive += 1
            if self.positive > 5:
                self.dt, self.alpha = min(1.1 * self.dt, 10 * self.dt0), 0.99 * self.alpha
        else:
            self.v.zero_()
            self.dt, self.alpha, self.positive = 0.5 * self.dt, 0.1, 0
        self.v = self.v + self.dt * force
        move = self.dt * self.v
        length = move.norm(dim=-1, keepdim=True)
        return move * (self.max_move / length.clamp_min(self.max_move))

    def reject(self, what: str) -> None:
        """A step led to a non-finite loss or gradient: forget the velocity and halve the step."""
        self.v.zero_()
        self.dt, self.alpha, self.positive = 0.5 * self.dt, 0.1, 0
        if self.dt < 1e-10 * self.dt0:
            raise FloatingPointError(
                f"{what}: the loss or gradient stays non-finite even after the step was halved 33 times. HINT: check"
                " that both ends have finite loss, or pass a smaller `step_size`."
            )


def _descend(
    objective: Energy, theta: Tensor, fire: _Fire, n_steps: int, tol: float, scale: float
) -> tuple[Tensor, int]:
    """FIRE on ``L`` from ``theta`` until ``|grad L| <= tol * scale``: an intermediate minimum of a path."""
    grad = objective.grad(theta)
    used = 1
    for _ in range(n_steps):
        if float(grad.norm()) <= tol * scale:
            break
        moved = theta + fire.step(-grad)
        new = objective.grad(moved)
        used += 1
        if not torch.isfinite(new).all():
            fire.reject("quenching an intermediate minimum")
            continue
        theta, grad = moved, new
    return theta, used


def minimum_energy_path(
    objective: Energy,
    theta_a: Tensor,
    theta_b: Tensor,
    n_images: int = 15,
    method: Literal["string", "neb"] = "string",
    climbing: bool = True,
    *,
    step_size: float | None = None,
    n_steps: int = 1000,
    tol: float = 1e-3,
    spring: float | None = None,
    quench_steps: int = 500,
    ftol: float = 0.0,
    window: int = 20,
) -> PathResult:
    """The minimum-energy path from ``theta_a`` to ``theta_b`` (both should be minima).

    The images move by FIRE under the force perpendicular to the path (string: then redistributed to equal arc
    length; NEB: plus the spring force along it), starting from the straight line. The path has converged when
    the largest perpendicular force on an image is below ``tol`` times the gradient scale of the problem (the
    largest gradient on the straight line between the ends), a criterion that does not depend on the step, or,
    with ``ftol > 0``, when the last ``window`` iterations changed no image's loss by more than ``ftol``: the
    profile, and so the barrier, is resolved to ``ftol`` (``criterion`` says which). ReLU networks need the second:
    the perpendicular force does not vanish on the kinks of their loss. A step that gives a non-finite loss or
    gradient is taken back and halved.

    Args:
        objective: an :class:`~lightning_landscape.Objective` (its ``loss``, ``grad`` and, for the default step,
            ``hvp`` are used).
        theta_a: one end (kept fixed).
        theta_b: the other end (kept fixed).
        n_images: images on the path, ends included.
        method: ``"string"`` or ``"neb"``.
        climbing: refine the highest image to the saddle (to the same ``tol``), once the path has converged; the
            highest image of an unconverged path is an upper bound of the barrier along it.
        step_size: FIRE's first time step. Default: ``0.5 / sqrt(lambda_max)``, with ``lambda_max`` the largest
            Hessian eigenvalue at the ends (Lanczos): FIRE's update is stable for ``dt < 2 / sqrt(lambda)``.
        n_steps: iterations at most for the path, and again for the climbing image.
        tol: convergence, relative to the gradient scale (see above).
        spring: NEB spring constant. Default: ``0.1 lambda_max``, so that the springs hold the images apart at any
            scale of the loss without stiffening the band.
        quench_steps: FIRE iterations that refine each intermediate minimum.
        ftol: the energy resolution (loss units) of the second criterion (also for the climbing image); 0
            (default): the force criterion alone.
        window: the iterations over which the losses must have settled to ``ftol``.

    Raises:
        ValueError: for fewer than 3 images or an unknown method.
        FloatingPointError: when the loss stays non-finite even with a step halved 33 times.
    """
    if n_images < 3:
        raise ValueError(f"`n_images` must be at least 3, got {n_images}.")
    if method not in ("string", "neb"):
        raise ValueError(f"`method` must be 'string' or 'neb', got {method!r}.")
    dtype = objective.dtype
    a, b = theta_a.detach().to(dtype), theta_b.detach().to(dtype)
    ts = torch.linspace(0, 1, n_images, dtype=dtype).unsqueeze(1)
    images = a + ts * (b - a)
    grads = _grads(objective, images)
    if not torch.isfinite(grads[[0, -1]]).all():
        raise FloatingPointError("minimum_energy_path: the gradient at an end is not finite. HINT: pass finite minima.")
    scale = float(grads[torch.isfinite(grads).all(1)].norm(dim=1).max())
    n_grad = n_images
    lam = _curvature(objective, (a, b)) if step_size is None or (spring is None and method == "neb") else None
    dt = step_size if step_size is not None else 0.5 / math.sqrt(lam)
    spring = spring if spring is not None else 0.1 * (lam or 0.0)

    def forces(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(force on the interior images, |perpendicular gradient| of each, energies)``."""
        g = _grads(objective, x[1:-1])
        energies = _losses(objective, x)
        tau = _tangents(x, energies)[1:-1]
        perp = g - (g * tau).sum(1, keepdim=True) * tau
        force = -perp
        if method == "neb":  # converged when the whole NEB force vanishes: spring forces balanced too
            dist = (x[1:] - x[:-1]).norm(dim=1)
            force = force + spring * (dist[1:] - dist[:-1]).unsqueeze(1) * tau
            return force, force.norm(dim=1), energies
        return force, perp.norm(dim=1), energies

    max_move = 0.5 * float((b - a).norm()) / (n_images - 1)
    fire = _Fire(dt, max_move)
    force, perp, energies = forces(images)
    history = [energies]
    criterion = ""
    for _ in range(n_steps):
        if float(perp.max()) <= tol * scale:
            criterion = "force"
            break
        if ftol > 0 and len(history) > window and float((history[-window - 1] - energies).abs().max()) <= ftol:
            criterion = "energy"
            break
        moved = images.clone()
        moved[1:-1] = images[1:-1] + fire.step(force)
        if method == "string":
            moved = _redistribute(moved)
        new_force, new_perp, new_energies = forces(moved)
        n_grad += n_images - 2
        if not (torch.isfinite(new_force).all() and torch.isfinite(new_energies).all()):
            fire.reject("minimum_energy_path")
            continue
        if method == "string":  # the redistribution moved the images along the path: keep only the velocity across
            tau = _tangents(moved, new_energies)[1:-1]
            fire.v = fire.v - (fire.v * tau).sum(1, keepdim=True) * tau
        images, force, perp, energies = moved, new_force, new_perp, new_energies
        history.append(energies)
    converged = bool(criterion)
    losses = energies.clone()
    top = int(torch.argmax(losses[1:-1])) + 1
    if climbing and converged:  # on an unrelaxed path the climb can leave the path and overshoot
        climber, saddle, climbed, heights = _Fire(fire.dt0, max_move), images[top].clone(), False, []
        for _ in range(n_steps):
            local = torch.stack([images[top - 1], saddle, images[top + 1]])
            height = objective.loss(saddle)
            heights.append(float(height))
            tau = _tangents(local, torch.stack([losses[top - 1], height, losses[top + 1]]))[1]
            grad = objective.grad(saddle)
            n_grad += 1
            if not torch.isfinite(grad).all():
                climber.reject("the climbing image")
                saddle, heights = images[top].clone(), []
                continue
            settled = ftol > 0 and len(heights) > window and abs(heights[-window - 1] - heights[-1]) <= ftol
            if float(grad.norm()) <= tol * scale or settled:
                climbed = True
                break
            saddle = saddle + climber.step(-(grad - 2 * torch.dot(grad, tau) * tau))
        if climbed:  # else the highest image of the converged path stays: an upper bound of the saddle
            images[top] = saddle
            losses[top] = objective.loss(saddle)
    values = losses.double().cpu().numpy()
    seg = (images[1:] - images[:-1]).norm(dim=1).double().cpu().numpy()
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    minima = []
    for i in dips(values):
        theta, used = _descend(objective, images[i], _Fire(fire.dt0, max_move), quench_steps, tol, scale)
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
        criterion=criterion,
        force_ratio=float(perp.max()) / scale if scale > 0 else 0.0,
    )
