"""Basin sampling: many short SGD or SGLD runs (replicas) from one point, recorded as sketched point clouds.

Replica ``r`` starts at ``theta_0`` and takes ``S`` steps at a constant learning rate ``eta`` on minibatches
``B_t`` drawn at random from a pool of training batches (all of one size ``B``):

    SGD   (``temperature = 0``):  theta <- theta - eta grad L_B(theta)
    SGLD  (``temperature = T``):  theta <- theta - eta grad L_B(theta) + sqrt(2 eta T) xi,   xi ~ N(0, I)

(Welling & Teh 2011). With heavy-ball ``momentum = beta`` (as ``torch.optim.SGD``: no dampening, not Nesterov) each
replica also carries a velocity ``v`` (0 at the start):

    v <- beta v + grad L_B(theta) + sqrt(2 T (1 - beta) / eta) xi,   theta <- theta - eta v

whose overdamped limit is SGD at the effective rate ``eta / (1 - beta)``: the SGLD noise enters with the gradient,
scaled so that the limit samples the same ``exp(-L / T)`` (for ``beta = 0`` it is plain SGLD; noise added to
``theta`` instead would overweight the well's spread, by 19% at ``eta k / (1 - beta) = 0.02``).

SGD is a weak first-order approximation of the SDE
``d theta = -grad L dt + sqrt(eta Sigma / B) dW`` (Li, Tai & E 2017), so at constant ``eta / B`` the replicas
explore the basin the way training does near ``theta_0``, and SGLD's ``T`` adds isotropic noise to hop
barriers. Every ``record_every`` steps a replica records its sketch ``R theta`` (the trajectory store's
:class:`~lightning_landscape.dynamics.SparseProjection`, so replicas and training trajectories share one basis),
its minibatch loss, and optionally the outputs on a probe set (permutation-invariant features).

Why by hand: the replicas must not touch the user's module or optimizer, so they run on flat vectors through
:class:`~lightning_landscape.Objective`; each replica has its own seeded generator (batch order and noise), so
replica ``r`` is the same whichever process runs it (DDP ranks split the replicas) and whichever replicas run
beside it. All replicas step together: one call of
:meth:`~lightning_landscape.Objective.minibatch_losses_and_grads` per step, which ``vmap``s the replicas' losses
(each on its own minibatch) and takes one backward where that is faster, so ``R`` replicas of a small network cost
about one step's Python overhead instead of ``R`` (``scripts/bench_energy.py --replicas-only``: 16 replicas of the
quickstart MLP 8-9x faster than one at a time, at about 1.1x the cost of the bare network's vmapped step; a
replica is bit-identical to itself run alone, and to the loop up to rounding). An SGD replica draws its whole batch
order at once (the same numbers as one draw per step); an SGLD replica draws batch and noise step by step.

Example (a 1-D double well: SGLD started in the well at ``x = -1`` also visits the one at ``x = 1``)::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> well = Objective(torch.nn.Linear(1, 1, bias=False).double(), [torch.zeros(1)],
    ...     loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2, dtype=torch.float64)
    >>> runs = sample_basin(well, torch.tensor([-1.0], dtype=torch.float64), replicas=4, steps=2000, lr=0.01,
    ...     temperature=0.3, seed=0)
    >>> runs.sketches.shape, bool((runs.sketches > 0.8).any())
    ((4, 2001, 1), True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.dynamics.store import TrajectoryStore

if TYPE_CHECKING:
    from lightning_landscape.objective import Objective


def replica_seed(seed: int, replica: int) -> int:
    """The seed of replica ``replica`` of a run seeded ``seed`` (independent streams, stable across processes)."""
    return int(np.random.SeedSequence([seed, replica]).generate_state(1)[0])


@dataclass
class Excursions:
    """Replicas of a basin-sampling run. Rows follow ``replica_ids``; ``steps`` are the recorded step indices."""

    replica_ids: np.ndarray  # (R,)
    steps: np.ndarray  # (n,)
    sketches: np.ndarray  # (R, n, k)
    losses: np.ndarray  # (R, n) minibatch loss at each recorded point
    finals: Tensor  # (R, P) the last point of every replica
    outputs: np.ndarray | None = None  # (R, n, D) probe-set outputs, when recorded
    n_grad: int = 0  # minibatch gradient evaluations
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def concatenate(cls, runs: Sequence[Excursions]) -> Excursions:
        """One set of replicas from several runs, sorted by replica id. Runs that a budget stopped early (see
        :func:`sample_basin`) recorded fewer points: all keep the recorded points of the shortest, so that every
        replica has the same ``steps``; each keeps its own final point (the last of a cut run, later for the
        others)."""
        ids = np.concatenate([r.replica_ids for r in runs])
        order = np.argsort(ids, kind="stable")
        n = min(len(r.steps) for r in runs)
        outputs = (
            None if any(r.outputs is None for r in runs) else np.concatenate([r.outputs[:, :n] for r in runs])[order]
        )
        return cls(
            replica_ids=ids[order],
            steps=min((r.steps for r in runs), key=len),
            sketches=np.concatenate([r.sketches[:, :n] for r in runs])[order],
            losses=np.concatenate([r.losses[:, :n] for r in runs])[order],
            finals=torch.cat([r.finals for r in runs])[torch.from_numpy(order)],
            outputs=outputs,
            n_grad=sum(r.n_grad for r in runs),
            meta=runs[0].meta,
        )

    def save(self, folder: str | Path, store_meta: dict[str, Any]) -> list[Path]:
        """Write each replica as a trajectory store ``<folder>/replica-<r>/`` (stats ``loss``, the sketches) and
        the outputs, if any, as ``<folder>/outputs.npy``. ``store_meta`` names the projection (k, seed, nnz)."""
        folder = Path(folder)
        paths = []
        for row, r in enumerate(self.replica_ids):
            store = TrajectoryStore.create(folder / f"replica-{int(r):03d}", {**store_meta, **self.meta})
            for j, step in enumerate(self.steps):
                store.append(int(step), {"loss": float(self.losses[row, j])}, sketch=self.sketches[row, j])
            store.flush()
            paths.append(store.path)
        if self.outputs is not None:
            np.save(folder / "outputs.npy", self.outputs)
        return paths


def saved_replicas(folder: str | Path) -> Iterator[tuple[int, int, np.ndarray, Path]]:
    """Every replica that :meth:`Excursions.save` wrote under ``folder`` (``<folder>/step-<n>/`` per trigger), in
    order of trigger and replica: ``(trigger step, replica id, its probe outputs (n, D), read lazily from the
    trigger's ``outputs.npy``, its trajectory store's path)``."""
    for trigger in sorted(Path(folder).glob("step-*")):
        outputs = np.load(trigger / "outputs.npy", mmap_mode="r")
        for k, replica in enumerate(sorted(trigger.glob("replica-*"))):
            yield int(trigger.name[5:]), int(replica.name[8:]), outputs[k], replica


def step_rule(meta: dict[str, Any]) -> tuple[float | None, float]:
    """``(lr, momentum)`` of a saved replica, from the meta :meth:`Excursions.save` wrote (momentum 0 in stores
    written before replicas had one)."""
    return meta.get("lr"), meta.get("momentum", 0.0)


def _stack_outputs(outputs: list[np.ndarray], probe: Objective | None, theta: Tensor, n: int) -> np.ndarray | None:
    if probe is None:
        return None
    if outputs:
        return np.stack(outputs)
    return np.zeros((0, n, probe.outputs(theta).numel()))  # no replicas here, but the shape other ranks have


def sample_basin(
    objective: Objective,
    theta: Tensor,
    replicas: int | Sequence[int] = 8,
    steps: int = 100,
    lr: float = 0.01,
    temperature: float = 0.0,
    *,
    seed: int = 0,
    sketch: SparseProjection | None = None,
    record_every: int = 1,
    probe: Objective | None = None,
    momentum: float = 0.0,
) -> Excursions:
    """Run replicas of SGD (``temperature=0``) or SGLD from ``theta`` on random batches of ``objective``.

    Args:
        objective: an :class:`~lightning_landscape.Objective` whose batches are the minibatch pool.
        theta: the starting point ``(P,)``, or one per replica ``(R, P)`` (rows in the order of ``replicas``).
        replicas: how many (ids ``0..R-1``), or the ids to run (a DDP rank's share).
        steps: steps per replica.
        lr: the constant learning rate ``eta``.
        temperature: SGLD temperature ``T`` (0: plain SGD).
        seed: seed of the run; replica ``r`` uses :func:`replica_seed` ``(seed, r)``.
        sketch: the projection of recorded points (default: the identity for ``P <= 256``, else a
            ``SparseProjection(P, 256, seed)``).
        record_every: record every this many steps (and the last one).
        probe: an objective whose :meth:`~lightning_landscape.Objective.outputs` are recorded at each
            recorded point (None: no outputs).
        momentum: heavy-ball momentum ``beta`` in ``[0, 1)`` (0: plain SGD/SGLD).

    Raises:
        ValueError: for non-positive ``steps``/``record_every``/``lr``, a negative ``temperature`` or a
            ``momentum`` outside ``[0, 1)``.
    """
    if steps < 1 or record_every < 1:
        raise ValueError(
            f"`steps` ({steps}) and `record_every` ({record_every}) must be positive integers. HINT: e.g. 100 and 5."
        )
    if not lr > 0:
        raise ValueError(f"`lr` must be positive, got {lr}. HINT: the training learning rate, e.g. 0.01.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}. HINT: 0 is plain SGD, > 0 SGLD.")
    if not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum}. HINT: the optimizer's, e.g. 0.9; 0 is SGD.")
    ids = list(range(replicas)) if isinstance(replicas, int) else [int(r) for r in replicas]
    theta = theta.detach().to(device=objective.device, dtype=objective.dtype)
    if theta.ndim == 2 and len(theta) != len(ids):
        raise ValueError(f"`theta` has {len(theta)} rows for {len(ids)} replicas. HINT: one row per replica, or (P,).")
    x = theta.expand(len(ids), -1).clone()  # all replicas, one row each, stepped together
    theta = theta if theta.ndim == 1 else theta[0] if len(theta) else x.new_zeros(theta.shape[1])
    if sketch is None and theta.numel() > 256:
        sketch = SparseProjection(theta.numel(), 256, seed=seed, device=theta.device)
    recorded = {s for s in range(steps + 1) if s % record_every == 0 or s == steps}
    n_batches = len(objective.batches)
    noise = (2.0 * lr * temperature) ** 0.5  # per step, on theta (plain SGLD)
    kick = (2.0 * temperature * (1.0 - momentum) / lr) ** 0.5  # per step, on the gradient (heavy-ball SGLD)
    velocity = torch.zeros_like(x) if momentum else None
    generators = [torch.Generator().manual_seed(replica_seed(seed, r)) for r in ids]

    def draws() -> Tensor:  # one standard normal vector per replica, from its own stream
        return torch.stack([torch.randn(x.shape[1:], generator=gen, dtype=x.dtype) for gen in generators]).to(x.device)

    rows: list[list[np.ndarray]] = [[] for _ in ids]
    values: list[list[float]] = [[] for _ in ids]
    outs: list[list[np.ndarray]] = [[] for _ in ids]
    order = None  # SGLD: a replica's stream gives its batch and then its noise, step by step
    if not temperature and ids:  # SGD draws only batches from it: all at once, the same numbers as one per step
        order = torch.stack([torch.randint(n_batches, (steps + 1,), generator=gen) for gen in generators], 1).tolist()
    with objective.evaluating() if hasattr(objective, "evaluating") else nullcontext():  # once, not every step
        for s in range(steps + 1):
            batches = order[s] if order else [int(torch.randint(n_batches, (1,), generator=gen)) for gen in generators]
            if s < steps or s in recorded:  # the last point needs only its loss
                loss, g = objective.minibatch_losses_and_grads(x, batches, with_grad=s < steps)
            if s in recorded:
                points = (sketch(x) if sketch is not None else x).double().cpu().numpy()
                for i, value in enumerate(loss.tolist()):
                    rows[i].append(points[i])
                    values[i].append(value)
                    if probe is not None:
                        outs[i].append(probe.outputs(x[i]).reshape(-1).double().cpu().numpy())
            if s in recorded and s < steps and len(rows[0] if ids else ()) >= 3 and time_up():
                # the analysis' budget (lightning_landscape.budget.deadline): the replicas end here, together
                recorded, steps = {r for r in recorded if r <= s}, s
                break
            if s < steps and velocity is not None:
                velocity = momentum * velocity + (g + kick * draws() if temperature else g)
                x = x - lr * velocity
            elif s < steps:
                x = x - lr * g
                if noise:
                    x = x + noise * draws()
    sketches = [np.stack(r) for r in rows]
    losses = values
    finals = list(x)
    outputs = [np.stack(o) for o in outs] if probe is not None else []
    k = sketch.k if sketch is not None else theta.numel()
    return Excursions(
        replica_ids=np.asarray(ids, dtype=np.int64),
        steps=np.asarray(sorted(recorded), dtype=np.int64),
        sketches=np.stack(sketches) if ids else np.zeros((0, len(recorded), k)),
        losses=np.asarray(losses, dtype=np.float64).reshape(len(ids), len(recorded)),
        finals=torch.stack(finals) if ids else theta.new_zeros((0, theta.numel())),
        outputs=_stack_outputs(outputs, probe, theta, len(recorded)),
        n_grad=len(ids) * steps,
        meta={
            "lr": lr,
            "temperature": temperature,
            "momentum": momentum,
            "seed": seed,
            "record_every": record_every,
            "steps": steps,
        },
    )
