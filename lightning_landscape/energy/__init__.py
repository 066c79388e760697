"""The energy landscape: one module per stage, each configured by one small dataclass (:mod:`.configs`), and
the result of a trigger or of an offline analysis as one object (:class:`EnergyResult`).

    sampling (SamplingConfig) -> quench (QuenchConfig) -> basins (BasinConfig, PathConfig)
    -> markov (MSMConfig) -> chain (MSMConfig) -> result (EnergyResult, written through a Reporter)

:class:`~lightning_landscape.EnergyLandscape` runs these stages at every trigger (it only schedules them, splits
them over DDP ranks and keeps to its budget); ``lightning-landscape analyze`` runs the joining, the Markov model
and the chain on recorded runs. Both build their tables with the same functions of :mod:`.result`, so both give
the same numbers in the same columns.

**The merge level: the noise along each barrier.** Two quenched minima are one basin when a path joins them whose
lower barrier is at most their merge level (:meth:`MinimaDatabase.basins`). By default (``merge_barrier=None``)
that level is the temperature of the replicas' noise *along the line between the two minima*,

    T_d = T + lr s_d / (2 (1 - beta)),    s_d = Var_B(g_B . d),    d = (theta_j - theta_i) / |theta_j - theta_i|,

with ``T`` the SGLD temperature, ``beta`` the replicas' heavy-ball momentum (0 for plain SGD) and ``s_d`` the
variance of the minibatch gradient projected on ``d`` (:class:`CrossingNoise`, measured on the pool of batches at
the current point). Why: SGD at step ``lr`` is, to first order, the Langevin process
``d theta = -grad L dt + sqrt(lr Sigma_B) dW`` (Li, Tai & E 2017); along ``d`` its stationary density is
``exp(-L / T_d)`` with ``T_d = lr s_d / 2``, and it crosses a barrier ``dE`` along ``d`` at the Arrhenius rate
``~ exp(-dE / T_d)``; heavy-ball momentum runs as SGD at ``lr / (1 - beta)``, and SGLD's own noise adds ``T``.
So a barrier below ``T_d`` is crossed as fast as the replicas relax, and one far above it is not crossed, however
large the noise in other directions: the noise summed over all directions (the noise level below) once merged
minima whose barrier was 1,300 times the noise along it. Assumptions: the noise at the minima is the noise at the
current point, and the crossing runs along the straight line (a curved path's tangent at its saddle may see
other noise). Pass ``BasinConfig(merge_barrier=...)`` for one fixed level for every pair.

**The noise level** ``T + lr tr(Sigma_B) / (4 (1 - beta))`` (:func:`noise_level`) is the mean excess loss that
SGD's noise holds it at above a minimum: for a quadratic basin ``H`` with noise covariance ``Sigma_B`` the
stationary covariance ``C`` of SGD at step ``lr`` solves ``HC + CH = lr Sigma_B`` (Mandt, Hoffman & Blei 2017), so
``E[L - L_min] = tr(HC) / 2 = lr tr(Sigma_B) / 4``. It is the scale of the energies the replicas explore, and a
tenth of it is the default energy resolution of quenches and paths.

**Joining.** A straight line between two minima bounds their saddle from above, at the cost of ``images``
forward passes: when its lower barrier is already below ``merge_barrier``, the two minima are one basin without a
minimum-energy path (recorded with ``method="linear"``). Only pairs that the line cannot join get a
minimum-energy path (FIRE, :func:`~lightning_landscape.geometry.paths.minimum_energy_path`), up to
``PathConfig.max_paths`` per call.

Example (the double well ``(x^2 - 1)^2``, barrier 1: two basins at ``merge_barrier=0.5``, one at 2)::

    >>> import tempfile, torch
    >>> from lightning_landscape import Objective
    >>> well = Objective(torch.nn.Linear(1, 1, bias=False).double(), [torch.zeros(1)],
    ...     loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2, dtype=torch.float64,
    ...     outputs_fn=lambda m, _: m.weight.reshape(1, 1))
    >>> db = MinimaDatabase(tempfile.mkdtemp())
    >>> for x in (-0.9, 0.8, 1.1):
    ...     _ = add_minimum(db, quench_point(well, torch.tensor([x], dtype=torch.float64), QuenchConfig()), step=0)
    >>> len(db), join_basins(db, well, [0, 1], 0.5, PathConfig(images=9))[0].n_basins
    (2, 2)
    >>> join_basins(db, well, [0, 1], 2.0, PathConfig(images=9))[0].n_basins
    1
"""

from __future__ import annotations

from lightning_landscape.budget import Budget
from lightning_landscape.dynamics.minima import MinimaDatabase
from lightning_landscape.energy.basins import BasinsResult, Joining, basins_of, join_basins, plan_joins
from lightning_landscape.energy.chain import (
    Chain,
    ChainRun,
    TrainingPath,
    TriggerChain,
    chain_of,
    chain_of_runs,
    read_replicas,
)
from lightning_landscape.energy.configs import BasinConfig, MSMConfig, PathConfig, QuenchConfig, SamplingConfig
from lightning_landscape.energy.markov import MarkovModel, markov_model, transition_between, transition_summary
from lightning_landscape.energy.quench import Minimum, add_minimum, quench_point
from lightning_landscape.energy.result import EnergyResult
from lightning_landscape.energy.run_minima import RunMinima
from lightning_landscape.energy.sampling import CrossingNoise, noise_level, sample

__all__ = [
    "BasinConfig",
    "BasinsResult",
    "Budget",
    "Chain",
    "ChainRun",
    "CrossingNoise",
    "EnergyResult",
    "Joining",
    "MSMConfig",
    "MarkovModel",
    "MinimaDatabase",
    "Minimum",
    "PathConfig",
    "QuenchConfig",
    "RunMinima",
    "SamplingConfig",
    "TrainingPath",
    "TriggerChain",
    "add_minimum",
    "basins_of",
    "chain_of",
    "chain_of_runs",
    "join_basins",
    "markov_model",
    "noise_level",
    "plan_joins",
    "quench_point",
    "read_replicas",
    "sample",
    "transition_between",
    "transition_summary",
]
