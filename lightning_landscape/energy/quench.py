"""Quenching a point to the minimum below it, with its certificate, and storing it in the minima database."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_landscape.dynamics.minima import Certificate, MinimaDatabase, certify, quench
from lightning_landscape.energy.configs import QuenchConfig

if TYPE_CHECKING:
    from lightning_landscape.objective import Objective


@dataclass
class Minimum:
    """A quenched point: where it ended, its loss, how well it converged, its certificate and its outputs on the
    probe set. A saddle carries the minima its two kicked sides were quenched to (``kicked``)."""

    theta: np.ndarray
    loss: float
    grad_norm: float
    grad_ratio: float
    converged: bool
    n_grad: int
    outputs: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    loss_drop: float = float("nan")  # how far the quench lowered the loss
    criterion: str = ""  # "gradient", "energy" or "" (not converged)
    certificate: Certificate | None = None
    kicked: list[Minimum] = field(default_factory=list)
    earlier_hvps: int = 0  # Hessian-vector products of the certificates before the last one (continued quenches)

    @property
    def certified(self) -> bool:
        return self.certificate is not None and self.certificate.certified

    @property
    def n_hvp(self) -> int:
        """Hessian-vector products of its certificates (the kicked sides' included)."""
        own = self.certificate.n_hvp if self.certificate is not None else 0
        return own + self.earlier_hvps + sum(k.n_hvp for k in self.kicked)

    @property
    def n_grad_total(self) -> int:
        """Gradients of its quenches (the kicked sides' included)."""
        return self.n_grad + sum(k.n_grad_total for k in self.kicked)


def energy_resolution(ftol: float | None, level: float) -> float:
    """The energy resolution of quenches and paths: ``ftol`` when given, else a tenth of the merge level ``level``
    (see :class:`QuenchConfig`)."""
    return ftol if ftol is not None else level / 10


#: whether a float64 quench is affordable on an objective, timed once per objective
_FLOAT64_AFFORDABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: the parameter vectors a certified quench holds: L-BFGS' 10 pairs and a Lanczos basis of 12 for its certificate
QUENCH_VECTORS = 34


def quench_objective(objective: Objective, dtype: str = "auto") -> Objective:
    """The objective quenches and certificates run on (see :attr:`QuenchConfig.dtype`): ``objective`` itself or its
    float64 twin; for ``"auto"``, the twin when a float64 quench (:data:`QUENCH_VECTORS` vectors) fits in memory and
    its loss costs at most 3x the objective's own, timed once (the decision is kept on the objective)."""
    from lightning_landscape.curvature.memory import vectors_that_fit

    if dtype == "float32" or objective.dtype == torch.float64:
        return objective
    if dtype == "auto" and vectors_that_fit(objective.numel, torch.float64, objective.device) < QUENCH_VECTORS:
        return objective
    twin = objective.in_dtype(torch.float64)
    if dtype == "float64":
        return twin
    affordable = _FLOAT64_AFFORDABLE.get(objective)
    if affordable is None:
        seconds = []
        for candidate in (objective, twin):  # a loss each (the forward's ratio is the gradient's)
            theta = candidate.theta0
            start = time.perf_counter()
            candidate.loss(theta)
            seconds.append(time.perf_counter() - start)
        affordable = _FLOAT64_AFFORDABLE[objective] = seconds[1] <= 3 * seconds[0]
    return twin if affordable else objective


def quench_point(
    objective: Objective,
    theta: Tensor,
    config: QuenchConfig,
    level: float = 0.0,
    kicks: int = 1,
    max_step: float | None = None,
    **info: Any,
) -> Minimum:
    """Quench ``theta`` on ``objective`` to the :func:`energy_resolution` for the merge level ``level`` and certify
    the end (see :class:`QuenchConfig`): quenched on while the certificate finds it still descending and
    ``config.max_iter`` lasts; a saddle is kicked both ways along its negative direction (``kicks`` levels deep)
    and both sides quenched, with L-BFGS steps of at most twice the kick (``max_step``), so that each side
    descends into the basin on its side of the saddle, into :attr:`Minimum.kicked`."""
    target = quench_objective(objective, config.dtype)
    start = theta.detach().to(device=target.device, dtype=target.dtype)
    loss0, g0 = target.loss_and_grad(start)
    # no finer than the rounding of the loss in the objective's own dtype (float32 for a network: its training loss)
    floor = 16 * float(torch.finfo(objective.dtype).eps) * abs(float(loss0))
    ftol = max(energy_resolution(config.ftol, level), floor)
    # a start that is already stationary (a saddle, exactly) is certified as it is: L-BFGS's first step, of length 1
    # along whatever direction the rounding gives the gradient, would carry it into one of its basins at random
    stationary = float(g0.norm()) * max(float(start.norm()), 1.0) <= 1e-9 * max(abs(float(loss0)), 1e-12)
    iterations = 0 if stationary else config.max_iter
    q = quench(target, start, max_iter=iterations, rtol=config.rtol, ftol=ftol, max_step=max_step)
    used = q.n_grad
    certificate = certify(target, q.theta, ftol, steps=config.hvps)
    # still descending by more than ftol: on, in `config.rounds` rounds of at most 200 iterations without the plateau
    # criterion (a slow descent lowers less than ftol per 20 iterations and can still have more than ftol to go),
    # each ended by a certificate, while max_iter lasts and the loss still falls
    earlier_hvps = 0
    for _ in range(config.rounds):
        if certificate.kind != "uncertified" or used + 25 > config.max_iter:
            break
        before, earlier_hvps = q.loss, earlier_hvps + certificate.n_hvp
        rounds = min(config.max_iter - used, 200)
        q = quench(target, q.theta, max_iter=rounds, rtol=config.rtol, ftol=0.0, max_step=max_step)
        used += q.n_grad
        certificate = certify(target, q.theta, ftol, steps=config.hvps)
        if before - q.loss <= floor:  # nothing lowered: the model's remaining descent is not there to be had
            break
    kicked = []
    if certificate.kind == "saddle":
        # along the negative direction, far enough that the quadratic model drops 10 resolutions (or 1e-6 |lambda|);
        # a saddle only when the energy there really is lower by more than the resolution, on one side at least
        lam = abs(certificate.lambda_min)
        size = (2 * max(10 * ftol, 1e-6 * lam) / lam) ** 0.5
        sides = [q.theta + sign * size * certificate.direction.to(q.theta) for sign in (1.0, -1.0)]
        descends = float(target.losses(torch.stack(sides)).min()) < q.loss - ftol
        if descends and kicks > 0:
            kicked = [quench_point(objective, side, config, level, kicks - 1, 2 * size, **info) for side in sides]
            descends = any(k.loss < q.loss - ftol for k in kicked)
        if not descends:
            # negative curvature that lowers nothing at this resolution (the smooth part of a ReLU kink, a valley
            # floor's rounding): judged by the remaining descent alone
            kind = "minimum" if certificate.energy_error <= ftol else "uncertified"
            certificate, kicked = replace(certificate, kind=kind, direction=None), []
    outputs = objective.outputs(q.theta.to(objective.dtype)).reshape(-1).double().cpu().numpy()
    return Minimum(
        q.theta.double().cpu().numpy(),
        q.loss,
        q.grad_norm,
        q.grad_ratio,
        q.converged,
        used,
        outputs,
        info,
        loss_drop=float(loss0) - q.loss,
        criterion=q.criterion,
        certificate=certificate,
        kicked=kicked,
        earlier_hvps=earlier_hvps,
    )


def add_minimum(db: MinimaDatabase, point: Minimum, **info: Any) -> tuple[int, int]:
    """``point`` into the database (deduplicated in function space) with its certificate: ``(id, new minima)``.
    A saddle is not stored: the minima of its kicked sides are, joined through it (``method="saddle"``: its loss
    bounds the saddle between them from above), and the id is the lower one's.

    Raises:
        ValueError: if its loss, parameters or outputs are not finite (for a saddle: those of all its sides).
    """
    if point.kicked:
        added, rejected = [], None
        for side in point.kicked:
            try:
                added.append(add_minimum(db, side, **{**point.info, **info}))
            except ValueError as err:
                rejected = err
        if not added:
            raise rejected or ValueError("a saddle without minima")
        ids = sorted({i for i, _ in added})
        if len(ids) == 2:
            set_saddle(db, ids[0], ids[1], point.loss, method="saddle", converged=True, **info)
        return min(ids, key=lambda i: db.records[i]["loss"]), sum(n for _, n in added)
    i, new = db.add(point.theta, point.loss, point.outputs, **{**certificate_fields(point), **point.info, **info})
    return i, int(new)


def certificate_fields(point: Minimum) -> dict[str, Any]:
    """What the database stores of a quenched point's convergence and certificate."""
    cert = point.certificate
    return {
        "grad_norm": point.grad_norm,
        "grad_ratio": point.grad_ratio,
        "quench_converged": point.converged,
        "quench_criterion": point.criterion,
        "certified": point.certified if cert is not None else None,
        "kind": cert.kind if cert is not None else "",
        "lambda_min": cert.lambda_min if cert is not None else float("nan"),
        "energy_error": cert.energy_error if cert is not None else float("nan"),
        "resolution": cert.resolution if cert is not None else float("nan"),
    }


def set_saddle(db: MinimaDatabase, i: int, j: int, highest: float, **info: Any) -> float:
    """Record the saddle of a path between ``i`` and ``j`` whose highest inner point is ``highest``: the highest
    point counts the ends too, and both barriers are stored. Returns the saddle loss."""
    li, lj = db.records[i]["loss"], db.records[j]["loss"]
    saddle = max(highest, li, lj)
    db.set_saddle(i, j, saddle, barrier_ij=saddle - li, barrier_ji=saddle - lj, **info)
    return saddle
