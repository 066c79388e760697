"""Minima: quenching points to nearby minima, and a persistent database of the distinct minima found.

* :func:`quench` minimizes the probe objective from a point with L-BFGS (``scipy.optimize``, in float64 on
  the host) or plain gradient descent, the "steepest-descent quench" of energy-landscape studies (Stillinger &
  Weber 1982; Wales 2003): it maps every point of a basin to the basin's minimum.
* :class:`MinimaDatabase` keeps the distinct minima with their losses, their outputs on the probe set and the
  saddles between pairs of them. Two minima are the same when their outputs differ by less than ``tol``
  relative to their size,

      d(i, j) = |f_i - f_j| / ((|f_i| + |f_j|) / 2),

  a distance in *function space*: networks that differ by a permutation of hidden units, or by a move along a
  flat valley that does not change the function, are one minimum. The database lives in a folder
  (``minima.json``, ``theta/<id>.npy``, ``outputs/<id>.npy``), written atomically, so it persists across
  triggers, resumed runs and offline analysis.

Example::

    >>> import tempfile, numpy as np
    >>> db = MinimaDatabase(tempfile.mkdtemp(), tol=0.05)
    >>> db.add(np.zeros(3), 0.5, np.array([1.0, 0.0]), step=10)
    (0, True)
    >>> db.add(np.ones(3), 0.49, np.array([1.01, 0.0]), step=20)   # the same function: the lower loss is kept
    (0, False)
    >>> db.add(np.ones(3), 0.7, np.array([0.0, 1.0]), step=30)
    (1, True)
    >>> db.set_saddle(0, 1, 0.9); db.saddle_matrix().tolist()
    [[0.0, 0.9], [0.9, 0.0]]
    >>> MinimaDatabase(db.path).losses.tolist()
    [0.49, 0.7]
    >>> db.basins(merge_barrier=0.25).tolist(), db.basins(merge_barrier=0.1).tolist()   # barriers 0.41 and 0.2
    ([0, 0], [0, 1])

**Basins.** Overparameterized networks have connected sets of minima, not isolated points, so quenched points
are grouped: two minima are in one basin when a known path joins them whose *lower* barrier,
``saddle - max(L_i, L_j)``, is at most ``merge_barrier`` (the regrouping of Carr & Wales 2005: the shallower
minimum escapes over that barrier as fast as the noise relaxes, so at that noise they are one state). Basins are
the connected components of that relation (union-find over the saddles). A basin's loss is its lowest member's,
and the saddle between two basins is the lowest saddle between their members.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.sparse.csgraph import minimum_spanning_tree
from threadpoolctl import threadpool_limits
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.curvature.lanczos import lanczos_tridiagonal, tridiagonal_eigh
from lightning_landscape.dynamics.store import _atomic_write

if TYPE_CHECKING:
    from lightning_landscape.objective import Objective


@dataclass
class Quench:
    """The minimum reached from a starting point."""

    theta: Tensor
    loss: float
    grad_norm: float
    n_grad: int
    converged: bool
    grad_ratio: float = float("nan")  # |grad| at the end over |grad| at the start (converged: <= rtol)
    loss_drop: float = float("nan")  # the loss at the start minus at the end
    last_drop: float = float("nan")  # what the last ``window`` iterations lowered the loss by (converged: <= ftol)
    criterion: str = ""  # what it converged on: "gradient", "energy", or "" (not converged)


def quench(
    objective: Objective,
    theta: Tensor,
    method: Literal["lbfgs", "gd"] = "lbfgs",
    max_iter: int = 200,
    rtol: float = 1e-3,
    lr: float = 0.1,
    ftol: float = 0.0,
    window: int = 20,
    max_step: float | None = None,
) -> Quench:
    """Descend from ``theta`` to a nearby minimum of ``objective``.

    The quench has converged, and stops, on either of two criteria (``criterion`` says which):

    * ``"gradient"``: the gradient norm has fallen to ``rtol`` times its value at the start,
      ``|grad L(theta_end)| <= rtol |grad L(theta)|``: relative to the gradient scale of the problem, like the
      paths' criterion, so that it means the same at any scale of the loss. (An absolute tolerance either never
      triggers on a loss of scale 1e3 or always on one of scale 1e-3.) ``grad_ratio`` reports it.
    * ``"energy"`` (when ``ftol > 0``): the last ``window`` iterations lowered the loss by at most ``ftol`` in all,
      ``L(x_{k - window}) - L(x_k) <= ftol``: the minimum is located to the energy resolution ``ftol``.
      ReLU networks need it: their minima lie on kinks of the loss, where the gradient does not vanish (measured
      on the quickstart MLP with weight decay 1e-2: the loss stops at 0.4257 in float64 with ``grad_ratio``
      0.026), and float32 line searches stall at ``grad_ratio`` ~1e-2. A loss that keeps falling, as
      cross-entropy without weight decay does on a set the network can fit, meets neither.
      ``last_drop`` reports it.

    Args:
        objective: anything with ``loss_and_grad(theta)`` (an :class:`~lightning_landscape.Objective`).
        theta: the start ``(P,)``.
        method: ``"lbfgs"`` (scipy's L-BFGS-B, float64) or ``"gd"`` (gradient descent with step ``lr``).
        max_iter: iterations (L-BFGS) or steps (gradient descent).
        rtol: convergence, relative to the gradient norm at the start.
        lr: the step of ``"gd"``.
        ftol: the energy resolution (loss units); 0 (default): the gradient criterion alone.
        window: the iterations over which the loss must have fallen by at most ``ftol``.
        max_step: L-BFGS moves at most this far in any coordinate in its first run: each run is bounded to a box
            around where it starts, of this half-width at first, and a run that ends on the box's edge starts the
            next from there in a box twice as wide (GMIN's maximum step, grown as the descent runs on). L-BFGS's
            first step has length 1 along the gradient and can jump into another basin; a quench that must stay in
            the basin of its start (a side of a saddle) needs a bound.
    """
    if method not in ("lbfgs", "gd"):
        raise ValueError(f"`method` must be 'lbfgs' or 'gd', got {method!r}. HINT: 'lbfgs' converges faster.")
    if not 0 < rtol < 1:
        raise ValueError(f"`rtol` must be in (0, 1), got {rtol}. HINT: e.g. 1e-3 (the gradient falls 1000-fold).")
    if not (ftol >= 0 and window >= 1):
        raise ValueError(f"`ftol` must be >= 0 and `window` >= 1, got ftol={ftol}, window={window}. HINT: ftol=0.")
    x0 = theta.detach().to(device=objective.device, dtype=objective.dtype)
    loss0, g0 = objective.loss_and_grad(x0)
    gtol = rtol * float(g0.norm())
    calls = 1
    history = [float(loss0)]  # the loss after each iteration

    def stalled() -> bool:
        return ftol > 0 and len(history) > window and history[-window - 1] - history[-1] <= ftol

    def track(intermediate_result: Any) -> None:
        history.append(float(intermediate_result.fun))
        if stalled() or time_up():  # time_up: the analysis' budget (lightning_landscape.budget.deadline)
            raise StopIteration  # scipy stops and returns this iterate

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal calls
        calls += 1
        loss, g = objective.loss_and_grad(torch.from_numpy(x).to(x0))
        return float(loss), g.double().cpu().numpy()

    if method == "lbfgs":
        # L-BFGS stops early when its line search fails (float32 losses, kinks of ReLU networks): it restarts from
        # where it stopped, with a fresh memory, until an iteration budget or a criterion is met; a restart that
        # makes no iteration counts as one that lowered nothing
        x_np = x0.double().cpu().numpy()
        on_edge, half_width = False, max_step
        while len(history) <= max_iter and not stalled() and not (len(history) > 1 and time_up()):
            box = None if half_width is None else [(v - half_width, v + half_width) for v in x_np.tolist()]
            # one BLAS thread for scipy: OpenBLAS workers that spin between calls slow every torch call in between
            # by up to 30x on a small CPU (measured: 1.2 s against 0.04 s for 100 iterations on a 1k-parameter MLP)
            with threadpool_limits(limits=1, user_api="blas"):
                res = minimize(
                    value_and_grad,
                    x_np,
                    jac=True,
                    method="L-BFGS-B",
                    # stop on the gradient (scipy's gtol bounds the largest entry, which is at most the norm), not on
                    # slow progress; convergence is judged on the norm below
                    options={"maxiter": max_iter + 1 - len(history), "gtol": gtol / len(x0) ** 0.5, "ftol": 1e-15},
                    callback=track,
                    bounds=box,
                )
            on_edge = box is not None and bool(np.any(np.abs(res.x - x_np) >= half_width * (1 - 1e-9)))
            if on_edge:  # out of the box: the next run's box is twice as wide (steps grow as the descent runs on)
                half_width *= 2
            x_np = res.x
            if res.nit == 0:
                history.append(float(res.fun))
            if res.status == 1 or float(np.linalg.norm(res.jac)) <= gtol:
                break
            if ftol == 0 and not on_edge:
                break
        x = torch.from_numpy(x_np).to(x0)
    else:
        x, g = x0, g0
        for _ in range(max_iter):
            if float(g.norm()) <= gtol or stalled() or time_up():
                break
            x = x - lr * g
            loss, g = objective.loss_and_grad(x)
            calls += 1
            history.append(float(loss))
    loss, g = objective.loss_and_grad(x)
    ratio = float(g.norm()) / max(float(g0.norm()), 1e-300)
    last = history[-window - 1] - history[-1] if len(history) > window else float("nan")
    criterion = "gradient" if float(g.norm()) <= gtol else "energy" if stalled() else ""
    return Quench(
        x, float(loss), float(g.norm()), calls + 1, bool(criterion), ratio, float(loss0 - loss), last, criterion
    )


@dataclass
class Certificate:
    """What is known of a quenched point (:func:`certify`)."""

    kind: Literal["minimum", "saddle", "uncertified"]
    grad_norm: float
    lambda_min: float  # the smallest Ritz value: an upper bound of the smallest Hessian eigenvalue
    lambda_max: float  # the largest Ritz value (a lower bound of the largest eigenvalue)
    energy_error: float  # the remaining descent the quadratic model predicts, with the loss's rounding
    resolution: float  # the energy resolution asked for
    n_hvp: int  # Hessian-vector products spent
    direction: Tensor | None = None  # a saddle's direction of negative curvature (unit norm)

    @property
    def certified(self) -> bool:
        return self.kind == "minimum"


def certify(objective: Objective, theta: Tensor, resolution: float, steps: int = 20, seed: int = 0) -> Certificate:
    """The certificate of a quenched point: is ``theta`` a minimum, located to the energy ``resolution``?

    Two Lanczos runs of at most ``steps`` Hessian-vector products each (the practice of GMIN/OPTIM: a minimum is
    a stationary point without negative curvature, Wales 2003, ch. 6):

    * **Second order.** The smallest Ritz value ``lambda_min`` of ``H`` from a random start vector is an upper bound
      of the smallest eigenvalue (Ritz values lie inside the spectrum), so ``lambda_min < -1e-3 lambda_max`` proves
      negative curvature: ``kind="saddle"``, with the Ritz vector as ``direction``.
    * **Remaining descent.** Lanczos from the gradient ``g`` builds the Krylov space of ``g`` with ``T = Q^T H Q``,
      ``g = |g| Q e_1``. The quadratic model ``L(theta + d) ~ L + g^T d + d^T H d / 2`` descends within that space
      by the Newton decrement

          g^T H^{-1} g / 2 ~ |g|^2 e_1^T T^{-1} e_1 / 2.

      The Gauss rule (``T`` of ``steps`` Lanczos steps) bounds it from below; ``energy_error`` is the Gauss-Radau
      rule with the node ``a = max(lambda_min / 2, 1e-6 lambda_max)`` added, an upper bound whenever ``a`` is at
      most the smallest eigenvalue of ``H`` (the Ritz value ``lambda_min`` lies above it, by 17% on a tanh MLP
      after 20 steps, where the rule at ``a = lambda_min`` fell 1% short of the true remaining descent; half of it
      is below) (Golub & Meurant, *Matrices, Moments and Quadrature*, 2010, ch. 6), plus
      ``16 eps |L|``, the rounding of the loss in the objective's dtype. A gradient along a direction flatter than
      ``a`` gives a large error, not none. At a minimum located to ``resolution`` this is at most
      ``resolution``: ``kind="minimum"``; otherwise ``"uncertified"`` (still descending, or on a plateau whose
      end the model cannot see). It is an estimate from the local quadratic model, not a rigorous bound: on a
      kink of a ReLU network the model sees only the smooth part.

    Example (the saddle of ``(x^2 - 1)^2 / 2 + 2 y^2`` at the origin, and its minimum at ``(1, 0)``)::

        >>> import torch
        >>> from lightning_landscape import Objective
        >>> well = Objective(torch.nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)], dtype=torch.float64,
        ...     loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2 / 2 + 2 * m.weight[0, 1] ** 2)
        >>> saddle = certify(well, torch.zeros(2, dtype=torch.float64), resolution=1e-6)
        >>> saddle.kind, round(saddle.lambda_min, 6), saddle.direction.abs().round(decimals=6).tolist()
        ('saddle', -2.0, [1.0, 0.0])
        >>> certify(well, torch.tensor([1.0, 1e-5], dtype=torch.float64), resolution=1e-6).kind
        'minimum'
        >>> certify(well, torch.tensor([1.0, 1e-3], dtype=torch.float64), resolution=1e-6).kind   # 2e-6 above it
        'uncertified'
    """
    x = theta.detach().to(device=objective.device, dtype=objective.dtype)
    loss, g = objective.loss_and_grad(x)
    product = objective.hvp_at(x)
    steps = max(2, min(steps, objective.numel))
    n_hvp = 0

    def matvec(v: Tensor) -> Tensor:
        nonlocal n_hvp
        n_hvp += 1
        return product(v)

    start = torch.randn(objective.numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x)
    alpha, beta, basis = lanczos_tridiagonal(matvec, start, steps, max_vectors=steps + 2, restart=True)
    ritz, vectors = tridiagonal_eigh(alpha, beta)
    lambda_min, lambda_max = float(ritz[0]), float(ritz[-1])
    scale = max(abs(lambda_max), abs(lambda_min))
    g_norm = float(g.norm())
    rounding = 16 * float(torch.finfo(objective.dtype).eps) * abs(float(loss))
    error = rounding
    if g_norm > 0:
        alpha_g, beta_g, _ = lanczos_tridiagonal(matvec, g, steps + 1, max_vectors=steps + 3)
        scale = max(scale, float(alpha_g.abs().max()))
        floor = max(1e-6 * scale, 1e-300)
        error += 0.5 * g_norm**2 * _radau_inverse(alpha_g, beta_g, max(lambda_min / 2, floor), steps)
    if lambda_min < -1e-3 * scale:
        direction = basis @ vectors[:, 0]
        return Certificate(
            "saddle", g_norm, lambda_min, lambda_max, error, resolution, n_hvp, direction / direction.norm()
        )
    kind = "minimum" if error <= max(resolution, rounding) else "uncertified"
    return Certificate(kind, g_norm, lambda_min, lambda_max, error, resolution, n_hvp)


def _radau_inverse(alpha: Tensor, beta: Tensor, a: float, steps: int) -> float:
    """``e_1^T T^{-1} e_1`` for the Lanczos tridiagonal (``alpha``, ``beta``) of at most ``steps + 1`` steps, by the
    Gauss-Radau rule with the prescribed node ``a``: the first ``m <= steps`` steps extended by one row whose
    diagonal makes ``a`` an eigenvalue. An exhausted Krylov space (fewer steps) is exact: plain Gauss."""
    m = len(alpha) - 1
    if m < steps:  # an invariant subspace: T^{-1} is exact there
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        return float(torch.linalg.solve(T, torch.eye(len(alpha), dtype=T.dtype, device=T.device)[0])[0])
    T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    eye = torch.eye(m + 1, dtype=T.dtype, device=T.device)
    delta = torch.linalg.solve(T - a * eye[:m, :m], beta[m - 1] ** 2 * eye[m - 1, :m])
    extended = torch.zeros_like(eye)
    extended[:m, :m] = T
    extended[m - 1, m] = extended[m, m - 1] = beta[m - 1]
    extended[m, m] = a + delta[-1]
    return float(torch.linalg.solve(extended, eye[0])[0])


def function_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|a - b| / ((|a| + |b|) / 2)``: the relative distance between two output vectors."""
    scale = 0.5 * (np.linalg.norm(a) + np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / max(scale, 1e-30))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class MinimaDatabase:
    """Distinct minima (deduplicated in function space) and the saddles between them, kept in ``path``.

    Args:
        path: the folder (created; an existing database there is loaded).
        tol: relative output distance below which two minima are one (see the module docstring).
        meta: how the minima were evaluated (probe set, BN mode, ...), kept with them (the stored one wins).

    Attributes:
        records: one dict per minimum: ``id``, ``loss``, ``step`` and anything passed to :meth:`add`.
        saddles: ``{(i, j): {"saddle": loss, ...}}`` for ``i < j``.
    """

    def __init__(self, path: str | Path, tol: float = 0.05, meta: dict[str, Any] | None = None) -> None:
        if not tol > 0:
            raise ValueError(f"`tol` must be positive, got {tol}. HINT: e.g. 0.05 (5% relative output distance).")
        self.path, self.tol, self.meta = Path(path), tol, dict(meta or {})
        self.records: list[dict[str, Any]] = []
        self.saddles: dict[tuple[int, int], dict[str, Any]] = {}
        self._outputs: list[np.ndarray] = []
        #: the barrier under which minima are one basin, stored with the basins in ``minima.json`` (None: not yet)
        self.merge_barrier: float | None = None
        index = self.path / "minima.json"
        if index.exists():
            self._load(index)

    def _load(self, index: Path) -> None:
        """Read ``minima.json`` and the outputs; a corrupt or inconsistent database is a clear error naming the file."""
        hint = "HINT: restore the folder from the run, or leave it out of the analysis."
        try:
            data = json.loads(index.read_text())
            records, saddles = data["minima"], data["saddles"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a minima database ({type(err).__name__}: {err}). {hint}") from err
        if [r.get("id") for r in records] != list(range(len(records))):
            raise ValueError(f"{index}: the minima ids are not 0..{len(records) - 1}. {hint}")
        bad = [(s.get("i"), s.get("j")) for s in saddles if not (0 <= s.get("i", -1) < s.get("j", -1) < len(records))]
        if bad:
            raise ValueError(f"{index}: saddles {bad[:3]} name minima that are not in the database. {hint}")
        for r in records:
            for folder in ("theta", "outputs"):
                file = self.path / folder / f"{r['id']:05d}.npy"
                if not file.exists():
                    raise ValueError(f"{file} is missing. {hint}")
        self.records, self.meta = records, data.get("meta", self.meta)
        self.merge_barrier = data.get("merge_barrier")
        self.saddles = {(int(s["i"]), int(s["j"])): s for s in saddles}
        self._outputs = [np.load(self.path / "outputs" / f"{r['id']:05d}.npy") for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def losses(self) -> np.ndarray:
        return np.asarray([r["loss"] for r in self.records], dtype=float)

    @property
    def certified(self) -> list[bool]:
        """Whether each minimum is known to be one: all but those stored with ``certified=False`` (a database
        written before certificates holds none such)."""
        return [r.get("certified") is not False for r in self.records]

    def theta(self, i: int) -> np.ndarray:
        return np.load(self.path / "theta" / f"{i:05d}.npy")

    def outputs(self, i: int) -> np.ndarray:
        return self._outputs[i]

    def nearest(self, outputs: np.ndarray) -> tuple[int | None, float]:
        """The stored minimum closest in function space to ``outputs``, and its distance."""
        if not self.records:
            return None, float("inf")
        distances = [function_distance(outputs, o) for o in self._outputs]
        best = int(np.argmin(distances))
        return best, distances[best]

    def add(self, theta: np.ndarray, loss: float, outputs: np.ndarray, **info: Any) -> tuple[int, bool]:
        """Add a minimum unless one within ``tol`` exists (then keep the lower loss of the two in its place).
        Returns ``(id, is_new)``.

        Raises:
            ValueError: if the loss, the parameters or the outputs are not finite (a diverged point is no minimum).
        """
        outputs = np.asarray(outputs, dtype=np.float32).reshape(-1)
        if not (np.isfinite(loss) and np.isfinite(outputs).all() and np.isfinite(np.asarray(theta)).all()):
            raise ValueError(
                f"not a minimum: the loss ({loss}), parameters or outputs are not finite (a diverged point)."
                " HINT: lower the learning rate of the replicas (`lr`) or the SGLD `temperature`."
            )
        match, distance = self.nearest(outputs)
        if match is not None and distance < self.tol:
            record = self.records[match]
            record["visits"] = record.get("visits", 1) + 1
            record.setdefault("visit_steps", []).append(info.get("step"))
            if loss < record["loss"]:
                record.update({"loss": float(loss), **info})
                self._write_arrays(match, theta, outputs)
            self.save()
            return match, False
        new = len(self.records)
        step = info.get("step")
        self.records.append(
            {"id": new, "loss": float(loss), "visits": 1, "first_step": step, "visit_steps": [step], **info}
        )
        self._outputs.append(outputs)
        self._write_arrays(new, theta, outputs)
        self.save()
        return new, True

    def relocate(self, i: int, theta: np.ndarray, loss: float, outputs: np.ndarray, **info: Any) -> None:
        """Replace minimum ``i``'s point by a better-located one of the same minimum (a further quench of it): its
        loss, parameters, outputs and ``info`` (e.g. its new certificate). Saddles to it stay: they still bound the
        saddles from above."""
        outputs = np.asarray(outputs, dtype=np.float32).reshape(-1)
        self.records[i].update({"loss": float(loss), **info})
        self._write_arrays(i, theta, outputs)
        self.save()

    def _write_arrays(self, i: int, theta: np.ndarray, outputs: np.ndarray) -> None:
        self._outputs[i] = outputs
        for folder, array in (("theta", np.asarray(theta, dtype=np.float32)), ("outputs", outputs)):
            (self.path / folder).mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path / folder / f"{i:05d}.npy", lambda fh, a=array: np.save(fh, a))

    def set_saddle(self, i: int, j: int, saddle: float, **info: Any) -> None:
        """Record the highest loss on the best known path between minima ``i`` and ``j`` (a lower one replaces
        a higher one: every path bounds the true saddle from above)."""
        key = (min(i, j), max(i, j))
        if not np.isfinite(saddle):
            raise ValueError(f"the saddle between minima {i} and {j} is not finite ({saddle}): the path diverged.")
        if key not in self.saddles or saddle < self.saddles[key]["saddle"]:
            self.saddles[key] = {"i": key[0], "j": key[1], "saddle": float(saddle), **info}
            self.save()

    def saddle_matrix(self) -> np.ndarray:
        """``(n, n)`` saddle losses, ``inf`` where no path is known, 0 on the diagonal."""
        n = len(self.records)
        out = np.full((n, n), np.inf)
        np.fill_diagonal(out, 0.0)
        for (i, j), s in self.saddles.items():
            out[i, j] = out[j, i] = s["saddle"]
        return out

    def distance_matrix(self) -> np.ndarray:
        """Pairwise function-space distances of the stored minima."""
        n = len(self.records)
        out = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                out[i, j] = out[j, i] = function_distance(self._outputs[i], self._outputs[j])
        return out

    def basins(self, merge_barrier: float | None = None) -> np.ndarray:
        """The basin of every minimum (``(n,)`` labels, basin 0 the lowest), merging minima joined by a path whose
        lower barrier is at most ``merge_barrier`` (default: :attr:`merge_barrier`; when that is None too, each
        saddle's own ``merge_level``, the noise along that barrier, else 0) or at most the sum of its ends'
        ``energy_error`` (a barrier no larger than the error of its ends is not
        resolved). A minimum stored with ``certified=False`` (not known to be a minimum: still descending, or a
        saddle) is never merged: it stays a basin of its own, and no basin is joined through it."""
        level = self.merge_barrier if merge_barrier is None else merge_barrier
        parent = list(range(len(self.records)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        losses = self.losses
        certified = self.certified
        errors = [r.get("energy_error") or 0.0 for r in self.records]
        for (i, j), s in self.saddles.items():
            if not (certified[i] and certified[j]):
                continue  # never merged through a point that is not known to be a minimum
            # a barrier within the energy error of its ends separates nothing that is known
            pair_level = float(level) if level is not None else float(s.get("merge_level") or 0.0)
            if s["saddle"] - max(losses[i], losses[j]) <= max(pair_level, errors[i] + errors[j]):
                parent[root(i)] = root(j)
        roots = np.asarray([root(i) for i in range(len(parent))], dtype=int)
        lowest = {r: losses[roots == r].min() for r in set(roots.tolist())}
        order = sorted(lowest, key=lambda r: (lowest[r], r))
        return np.asarray([order.index(r) for r in roots], dtype=int)

    def basin_summary(self, labels: np.ndarray) -> list[dict[str, Any]]:
        """One row per basin: ``basin``, ``loss`` (its lowest member's), ``minimum`` (that member's id), ``members``
        (ids), ``visits`` (summed), ``first_step`` (its earliest member's), ``certified`` (some member is a certified
        minimum; a basin of uncertified points alone is no known basin)."""
        rows, certified = [], self.certified
        for basin in range(int(labels.max()) + 1 if len(labels) else 0):
            members = np.flatnonzero(labels == basin).tolist()
            lowest = min(members, key=lambda i: self.records[i]["loss"])
            steps = [self.records[i].get("first_step", self.records[i].get("step")) for i in members]
            steps = [s for s in steps if s is not None]
            rows.append(
                {
                    "basin": basin,
                    "loss": float(self.records[lowest]["loss"]),
                    "minimum": lowest,
                    "members": members,
                    "visits": int(sum(self.records[i].get("visits", 1) for i in members)),
                    "first_step": min(steps) if steps else None,
                    "certified": any(certified[i] for i in members),
                }
            )
        return rows

    def basin_saddles(self, labels: np.ndarray) -> np.ndarray:
        """``(B, B)`` saddle losses between basins (the lowest known saddle between their members), ``inf`` where no
        path is known, 0 on the diagonal."""
        n = int(labels.max()) + 1 if len(labels) else 0
        out = np.full((n, n), np.inf)
        np.fill_diagonal(out, 0.0)
        for (i, j), s in self.saddles.items():
            a, b = labels[i], labels[j]
            if a != b and s["saddle"] < out[a, b]:
                out[a, b] = out[b, a] = s["saddle"]
        return out

    def missing_tree_edges(self) -> list[tuple[int, int]]:
        """Edges of the minimum spanning tree (function-space distances) that have no saddle yet, shortest first:
        the paths to compute so that every minimum is joined to the graph at the least cost."""
        if len(self.records) < 2:
            return []
        tree = minimum_spanning_tree(self.distance_matrix() + 1e-12 * ~np.eye(len(self.records), dtype=bool))
        rows, cols = tree.nonzero()
        edges = sorted(zip(rows.tolist(), cols.tolist(), tree.data.tolist(), strict=True), key=lambda e: e[2])
        return [(min(i, j), max(i, j)) for i, j, _ in edges if (min(i, j), max(i, j)) not in self.saddles]

    def absorb(self, other: MinimaDatabase, **info: Any) -> dict[int, int]:
        """Add every minimum and saddle of ``other`` (e.g. another run's database), deduplicated; ``info`` is stored
        with each added minimum (e.g. ``run="seed-1"``). Returns the map from ``other``'s ids to this one's."""
        ids = {}
        for record in other.records:
            extra = {k: v for k, v in record.items() if k not in ("id", "loss")}
            ids[record["id"]], _ = self.add(
                other.theta(record["id"]), record["loss"], other.outputs(record["id"]), **{**extra, **info}
            )
        for (i, j), saddle in other.saddles.items():
            if ids[i] != ids[j]:
                self.set_saddle(
                    ids[i],
                    ids[j],
                    saddle["saddle"],
                    **{k: v for k, v in saddle.items() if k not in ("i", "j", "saddle")},
                )
        return ids

    def rollback(self, step: int) -> None:
        """Forget what was found after ``step`` (a checkpoint's step, when a killed run resumes from it): minima first
        found later, their files, later visits and saddles recorded later. A stored minimum whose loss was lowered
        after ``step`` keeps its lower point (it is still a point of the same minimum)."""

        def found(record: dict[str, Any]) -> int:
            first = record.get("first_step", record.get("step"))
            return -1 if first is None else int(first)

        keep = 0
        while keep < len(self.records) and found(self.records[keep]) <= step:  # ids are given in step order
            keep += 1
        for record in self.records[keep:]:
            for folder in ("theta", "outputs"):
                (self.path / folder / f"{record['id']:05d}.npy").unlink(missing_ok=True)
        self.records, self._outputs = self.records[:keep], self._outputs[:keep]
        for record in self.records:
            visits = [v for v in record.get("visit_steps", []) if v is None or v <= step]
            record["visit_steps"], record["visits"] = visits, max(len(visits), 1)
        self.saddles = {
            key: s for key, s in self.saddles.items() if key[1] < keep and (s.get("step") is None or s["step"] <= step)
        }
        self.save()

    def copy_to(self, path: str | Path) -> MinimaDatabase:
        """A copy of this database in ``path`` (which must not exist yet), e.g. into a resumed run's folder."""
        shutil.copytree(self.path, path, ignore=shutil.ignore_patterns("*.tmp-*"))
        return MinimaDatabase(path, tol=self.tol)

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = {"tol": self.tol, "meta": self.meta, "minima": self.records, "saddles": list(self.saddles.values())}
        if self.records:  # the basins, for readers of the file (merge_barrier None: each saddle's merge_level)
            data["merge_barrier"] = self.merge_barrier
            data["basins"] = self.basin_summary(self.basins())
        text = json.dumps(_finite_or_none(data), indent=1, allow_nan=False)  # strict JSON: NaN becomes null
        _atomic_write(self.path / "minima.json", lambda fh: fh.write(text.encode()))
