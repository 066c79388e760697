"""Budgets: every trigger within a share of training time, inside Trainer(max_time), abandoned on SIGTERM; the
estimators return what they have at the deadline; the free-memory probe honours RLIMIT_AS."""

import json
import subprocess
import sys
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_landscape import Budget, FlatnessMonitor, LandscapeSampler, Objective
from lightning_landscape.budget import deadline, time_left, time_up
from lightning_landscape.curvature import hessian_eigenvalues, hessian_trace, spectral_density
from tests.helpers import loader, tiny_module_class


def test_the_allowance_is_the_share_of_training_less_what_was_spent_with_a_floor_and_a_cap():
    budget = Budget(share=0.1, floor=2.0, seconds=50.0)
    assert budget.allowance(trained=100.0, spent=3.0) == pytest.approx(7.0)
    assert budget.allowance(trained=100.0, spent=9.0) == 2.0  # overspent: the floor
    assert budget.allowance(trained=1e6, spent=0.0) == 50.0  # the cap
    assert Budget(share=None).allowance(10.0, 1e9) == float("inf")
    assert Budget.of(0.2, 0.05) == Budget(share=0.2)
    assert Budget.of("default", 0.03) == Budget(share=0.03)
    assert Budget.of({"share": 0.1, "floor": 1}, 0.05) == Budget(share=0.1, floor=1)
    assert Budget.of(None, 0.05).share is None


@pytest.mark.parametrize(
    "bad, words",
    [
        (2.0, "at most 1"),
        (-0.1, "budget.share"),
        ({"share": 0.1, "floor": -1}, "budget.floor"),
        ({"sconds": 3}, "share, floor, seconds, passes"),
        ("all", "share of training time"),
    ],
)
def test_bad_budgets_are_refused_in_the_constructor_naming_the_field(bad, words):
    with pytest.raises(ValueError, match="budget") as err:
        FlatnessMonitor(every_n_steps=1, budget=bad)
    assert words in str(err.value)


def test_a_pass_budget_on_a_callback_that_does_not_count_passes_is_refused():
    with pytest.raises(ValueError, match="does not count batch passes"):
        LandscapeSampler(budget={"passes": 1000})


def hessian_of_a_small_net(seed: int = 0) -> Objective:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(64, 3), torch.randint(0, 3, (64,))
    return Objective(net, [(x, y)], lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))


def test_estimators_stop_at_the_deadline_with_what_they_have_and_say_so():
    obj = hessian_of_a_small_net()
    full = hessian_eigenvalues(obj, k=1, tol=1e-8)
    assert full.converged and full.n_hvp > 10
    with deadline(0.0):
        assert time_up() and time_left() <= 0
        cut = hessian_eigenvalues(obj, k=1, tol=1e-8)
        trace = hessian_trace(obj, 300, method="hutchinson")
        density = spectral_density(obj, 5, 20)
    assert not cut.converged and cut.n_hvp < full.n_hvp
    assert cut.eigenvalues[0] <= full.eigenvalues[0] + 1e-9  # a Ritz value: a lower bound of lambda_max
    assert trace.n_random == 2 and np.isfinite(trace.std_error)
    assert len(density.nodes) == 1
    assert not time_up() and time_left() == float("inf")  # outside a deadline nothing is cut


def trainer_for(callbacks, tmp_path, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.slow
def test_each_trigger_keeps_to_its_share_and_still_reports_its_measure(tmp_path):
    # 10^5 SLQ vectors would take many minutes: the budget (a 0.3 s floor, a tiny share) cuts each trigger
    monitor = FlatnessMonitor(
        measures=["lambda_max", "density", "trace"],
        every_n_steps=3,
        budget={"share": 0.01, "floor": 0.3},
        probe={"size": 32},
        spectrum={"density_vectors": 10**5},
    )
    start = time.perf_counter()
    trainer_for([monitor], tmp_path, max_steps=6).fit(tiny_module_class()(), loader())
    assert time.perf_counter() - start < 10  # uncut, the first trigger alone would take minutes
    assert monitor.runs == 2 and monitor.failures == 0  # steps 3 and 6 (the fit end is step 6 again)
    for record in monitor.history:  # each trigger still reports its headline measure, and cuts the rest
        assert np.isfinite(record["lambda_max"]) and record["n_hvp"] < 10**5
        assert record["measures_cut"] >= 1 or record["n_hvp"] < 10**4
    assert all("budget" in path.read_text() for path in tmp_path.rglob("cut.jsonl"))


def test_the_sampler_shrinks_its_grid_to_the_budget_and_logs_the_resolution(tmp_path):
    sampler = LandscapeSampler(
        budget={"share": 0.01, "floor": 0.5}, probe={"size": 32}, slices={"resolution": 201, "line_points": 401}
    )
    trainer_for([sampler], tmp_path, max_steps=3).fit(tiny_module_class()(), loader())
    assert sampler.runs == 1 and sampler.failures == 0
    record = sampler.history[-1]
    assert 3 <= record["resolution"] < 201
    # the full grid, 2 x 201^2 + 401 + 25 points, takes ~10x the floor on this net; the cut one about the floor
    assert record["center_loss"] > 0


class SlowStep(tiny_module_class()):
    def training_step(self, batch, batch_idx):
        time.sleep(0.1)
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_no_fit_end_analysis_starts_after_max_time_has_run_out(tmp_path):
    monitor = FlatnessMonitor(
        measures=["density"], every_n_steps=None, budget=None, probe={"size": 32}, spectrum={"density_vectors": 10**5}
    )
    trainer = trainer_for([monitor], tmp_path, max_time={"seconds": 2}, max_epochs=1000)
    start = time.perf_counter()
    trainer.fit(SlowStep(), loader())
    assert time.perf_counter() - start < 6  # 10^5 SLQ vectors would take minutes
    assert monitor.runs == 0 and monitor.skipped == 1
    skipped = [json.loads(x) for path in tmp_path.rglob("skipped.jsonl") for x in path.open()]
    assert "max_time" in skipped[0]["reason"]


@pytest.mark.slow
def test_a_fit_end_analysis_is_cut_at_what_max_time_leaves(tmp_path):
    # no share limit, a 1 s floor: the fit-end trigger gets what the 5 s of max_time leave after 2 steps
    monitor = FlatnessMonitor(
        measures=["density"],
        every_n_steps=None,
        budget={"share": None, "floor": 1},
        spectrum={"density_vectors": 10**5},
    )
    trainer = trainer_for([monitor], tmp_path, max_time={"seconds": 5}, max_steps=2)
    start = time.perf_counter()
    trainer.fit(tiny_module_class()(), loader())
    assert time.perf_counter() - start < 7
    assert monitor.runs == 1 and monitor.history[-1]["n_hvp"] < 10**5


def test_a_running_analysis_is_abandoned_on_sigterm_and_training_stops(tmp_path):
    # SIGTERM arrives during the trigger (Lightning's handler sets `received_sigterm`); the trigger stops at the
    # next product and the fit ends as Lightning ends it after SIGTERM (SystemExit), seconds later, not minutes
    class Terminating(FlatnessMonitor):
        def analyze(self, trainer, pl_module, step):
            trainer._signal_connector.received_sigterm = True
            super().analyze(trainer, pl_module, step)

    monitor = Terminating(
        measures=["density"], spectrum={"density_vectors": 10**5}, every_n_steps=2, budget=None, probe={"size": 32}
    )
    trainer = trainer_for([monitor], tmp_path, max_steps=10)
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        trainer.fit(tiny_module_class()(), loader())
    assert time.perf_counter() - start < 10
    assert monitor.history[-1]["n_hvp"] < 100 and trainer.global_step == 2


@pytest.mark.slow
def test_free_memory_honours_the_address_space_limit():
    # in a child process: RLIMIT_AS = its current size + 300 MB; the probe must say at most 300 MB are free
    code = (
        "import resource, torch\n"
        "from lightning_landscape.curvature.memory import _status_bytes, free_bytes, host_limits\n"
        "size = _status_bytes('VmSize')\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 300 * 2**20, resource.RLIM_INFINITY))\n"
        "free = free_bytes(torch.device('cpu'))\n"
        "assert 'RLIMIT_AS' in host_limits() and 0 < free <= 300 * 2**20, (free, host_limits())\n"
        "print(free)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_memory_is_planned_at_setup_refused_with_sizes_or_fitted(monkeypatch):
    from lightning_landscape import EnergyLandscape, TrajectoryRecorder
    from lightning_landscape.curvature import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 200 * 2**20)  # 200 MiB free
    sampler = LandscapeSampler(max_snapshots=50)
    with pytest.warns(UserWarning, match="keeping at most 13"):
        sampler.plan_memory(10**6, torch.device("cpu"))  # 4 MB snapshots: 13 fit in a quarter of 200 MiB
    assert sampler.max_snapshots == 13
    with pytest.raises(MemoryError, match=r"needs at least 6 vectors.*GiB.*HINT"):
        sampler.plan_memory(5 * 10**6, torch.device("cpu"))  # 6 x 20 MB do not fit in half of 200 MiB
    with pytest.raises(MemoryError, match=r"certified float64 quench.*GiB.*HINT: quench.dtype='auto'"):
        EnergyLandscape(quench={"dtype": "float64"}).plan_memory(4 * 10**5, torch.device("cpu"))  # 34 x 3.2 MB
    EnergyLandscape().plan_memory(4 * 10**5, torch.device("cpu"))  # "auto": 34 float32 x 1.6 MB fit
    with pytest.raises(MemoryError, match=r"a path of 9 images.*HINT: fewer `paths.images`"):
        EnergyLandscape().plan_memory(10**6, torch.device("cpu"))  # 31 x 4 MB > half of 200 MiB
    EnergyLandscape().plan_memory(10**5, torch.device("cpu"))  # 34 x 0.8 MB fits
    with pytest.raises(MemoryError, match=r"TrajectoryRecorder on 20,000,000 parameters.*4 vectors.*HINT"):
        TrajectoryRecorder().plan_memory(2 * 10**7, torch.device("cpu"))  # 4 x 80 MB, half of 200 MiB holds 1
    TrajectoryRecorder().plan_memory(5 * 10**6, torch.device("cpu"))  # 4 x 20 MB fit


def test_an_auto_quench_is_float32_where_float64_would_not_fit(monkeypatch):
    from lightning_landscape.curvature import memory
    from lightning_landscape.energy.quench import quench_objective

    def mse(module, batch):
        return torch.nn.functional.mse_loss(module(batch[0]), batch[1])

    batches = [(torch.randn(8, 1000), torch.randn(8, 10))]
    objective = Objective(torch.nn.Linear(1000, 10), batches, mse)  # 10,010 parameters
    monkeypatch.setattr(memory, "free_bytes", lambda device: 4 * 10**6)  # room for 24 float64 vectors, not 34
    assert quench_objective(objective, "auto").dtype == torch.float32  # before any timing: it would not fit
    assert quench_objective(objective, "float64").dtype == torch.float64  # asked for: plan_memory refuses it


def test_replicas_stop_together_at_the_deadline_and_ragged_rounds_concatenate():
    from lightning_landscape.dynamics import sample_basin
    from lightning_landscape.dynamics.excursions import Excursions

    obj = hessian_of_a_small_net()
    theta = obj.theta0
    full = sample_basin(obj, theta, replicas=[0, 1], steps=50, lr=0.01, record_every=5)
    with deadline(0.0):
        cut = sample_basin(obj, theta, replicas=[2], steps=50, lr=0.01, record_every=5)
    assert len(full.steps) == 11 and cut.steps.tolist() == [0, 5, 10]  # 3 recorded points, then the deadline
    assert cut.sketches.shape[1] == 3 and cut.losses.shape == (1, 3)
    # the cut replica's final point is its last recorded one (115 parameters: the identity sketch)
    np.testing.assert_allclose(cut.sketches[0, -1], cut.finals[0].double().numpy(), rtol=1e-6)
    both = Excursions.concatenate([full, cut])
    assert both.steps.tolist() == [0, 5, 10] and both.sketches.shape[:2] == (3, 3) and len(both.finals) == 3
