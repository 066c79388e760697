"""The EnergyLandscape callback end to end: on a double well whose landscape is known exactly, on a real
network with W&B, under a budget, unchanged training, and 2 DDP ranks against 1 process."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_landscape import EnergyLandscape
from lightning_landscape.energy import MinimaDatabase, SamplingConfig
from lightning_landscape.report.dashboard import run_keys
from tests.ddp import run_script
from tests.helpers import (
    assert_dashboard_covers,
    assert_identical_runs,
    fit,
    loader,
    offline_wandb_records,
    tiny_module_class,
)
from tests.potentials import DoubleWell, train, well_energy


@pytest.fixture(scope="module")
def double_well(tmp_path_factory):
    energy = well_energy()
    train([energy], tmp_path_factory.mktemp("well"))
    return energy


@pytest.mark.slow
def test_double_well_minima_saddle_and_disconnectivity_are_exact(double_well):
    assert double_well.runs == 1 and double_well.failures == 0
    run = double_well.history[0]
    assert run["replicas_run"] == 8 and run["paths_run"] >= 1
    db = MinimaDatabase(double_well.reporter.run_dir / "minima")
    assert len(db) == 2  # every quench lands in one of the two wells, duplicates merged in function space
    thetas = sorted(db.theta(i).tolist() for i in range(2))
    np.testing.assert_allclose(thetas, [[-1.0, 0.0], [1.0, 0.0]], atol=1e-4)
    np.testing.assert_allclose(db.losses, 0.0, atol=1e-8)
    assert db.saddles[(0, 1)]["saddle"] == pytest.approx(0.5, rel=1e-3)  # the saddle at (0, 0)
    assert db.saddles[(0, 1)]["method"] == "string" and db.saddles[(0, 1)]["converged"]
    assert run["n_basins"] == 2 and run["quenches_converged"] == 9
    saved = np.load(double_well.reporter.run_dir / "energy-step0000002.npz")
    assert saved["saddles"][0, 1] == pytest.approx(0.5, rel=1e-3)


@pytest.mark.slow
def test_double_well_markov_state_model_finds_two_equally_populated_wells(double_well):
    run = double_well.history[0]
    assert run["metastable_states"] == 2
    rows = (double_well.reporter.run_dir / "metastable-step0000002.csv").read_text().splitlines()[1:]
    populations = sorted(float(r.split(",")[1]) for r in rows)
    # symmetric wells: Boltzmann gives 1/2 each; all replicas start in one well and hop ~10 times in all, so the
    # reversible estimate is good to about 0.1 (the exact statistics of an MSM are tested on a known chain)
    assert populations == pytest.approx([0.5, 0.5], abs=0.2)
    saved = np.load(double_well.reporter.run_dir / "energy-step0000002.npz")
    T = saved["transition_matrix"]
    np.testing.assert_allclose(T.sum(1), 1.0, atol=1e-10)
    pi = saved["stationary"]
    np.testing.assert_allclose(pi @ T, pi, atol=1e-10)
    # hopping the barrier is the slowest process, far slower than relaxing inside a well (1 / L'' = 1/8 time unit)
    assert run["slowest_timescale"] * 0.01 > 1.0
    for name in ("disconnectivity", "timescales", "paths", "free_energy"):
        assert (double_well.reporter.run_dir / f"{name}-step0000002.png").exists(), name
    replicas = sorted((double_well.reporter.run_dir / "excursions" / "step-000000002").glob("replica-*"))
    assert len(replicas) == 8


@pytest.mark.slow
def test_msm_on_probe_outputs_finds_the_two_wells_too(tmp_path):
    energy = well_energy(paths={"max_paths": 0}, msm={"features": "outputs"})
    train([energy], tmp_path)
    assert energy.history[0]["metastable_states"] == 2
    rows = (energy.reporter.run_dir / "metastable-step0000002.csv").read_text().splitlines()[1:]
    assert sorted(float(r.split(",")[1]) for r in rows) == pytest.approx([0.5, 0.5], abs=0.2)


def test_a_spent_time_budget_leaves_only_the_current_minimum(tmp_path):
    energy = EnergyLandscape(sampling={"replicas": 4, "steps": 50}, budget={"seconds": 1e-9}, probe={"size": 16})
    train([energy], tmp_path)
    run = energy.history[0]
    assert run["replicas_run"] == 0 and run["paths_run"] == 0 and run["n_minima"] == 1  # the quench of now, always
    assert run["spent_seconds"] > 0


@pytest.mark.slow
def test_energy_landscape_on_a_network_logs_to_wandb_within_budget(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ll-test")
    energy = EnergyLandscape(
        every_n_epochs=1,
        sampling={"replicas": 4, "steps": 20, "record_every": 2},
        basins={"merge_barrier": 0.0},  # every barrier separates: paths are computed (the noise level merges all)
        paths={"steps": 20, "max_paths": 2},
        probe={"size": 32},
    )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[energy],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    assert energy.runs == 2 and energy.failures == 0  # epoch 1 and epoch 2 (= fit end, deduplicated)
    keys = set(logger.experiment.summary.keys())
    for key in ("minima", "barriers", "disconnectivity", "paths", "n_minima", "spent_passes", "barrier_previous"):
        assert f"landscape-energy/{key}" in keys, key
    wandb.finish()
    # the dashboard has a panel for every key the run logged (read back from the offline run), and no other
    logged = run_keys(offline_wandb_records(tmp_path, b"landscape-energy/barrier_previous", path=True))
    assert_dashboard_covers(logged, {"landscape-energy"})
    first, second = energy.history
    assert second["n_minima"] >= first["n_minima"] >= 2 and second["paths_run"] >= 1
    assert first["spent_passes"] > 4 * 20  # at least the replicas' steps
    # a budget stops the work between items, and the spend is reported
    budgeted = EnergyLandscape(sampling={"replicas": 6, "steps": 20}, budget={"passes": 60}, probe={"size": 32})
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=[budgeted],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    run = budgeted.history[0]
    # a replica: 20 steps (40 passes), the last loss (1) and the probe outputs at 11 points (11): 52 passes
    assert run["replicas_run"] == 2 and run["paths_run"] == 0
    assert run["spent_passes"] >= 104


@pytest.mark.slow
def test_a_resumed_run_continues_the_minima_database(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit_epochs(epochs, energy, ckpt_path=None):
        pl.seed_everything(0)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=CSVLogger(tmp_path),
            enable_progress_bar=False,
            callbacks=[energy, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        )
        trainer.fit(tiny_module_class()(), train_dataloaders=loader(), ckpt_path=ckpt_path)

    settings = dict(every_n_epochs=1, at_fit_end=False, sampling={"replicas": 2, "steps": 5}, paths={"steps": 5})
    settings.update(probe={"size": 32})
    first = EnergyLandscape(**settings)
    fit_epochs(2, first)
    resumed = EnergyLandscape(**settings)
    fit_epochs(3, resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.reporter.run_dir != first.reporter.run_dir  # the logger starts a new version ...
    # ... and the database the checkpoint names is carried into it; the first run's folder is only read
    assert Path(resumed.minima_dir).parent == resumed.reporter.run_dir
    assert len(MinimaDatabase(first.minima_dir)) == first.history[-1]["n_minima"]
    assert [h["step"] for h in resumed.history] == [6, 12, 18]
    db = MinimaDatabase(resumed.minima_dir)
    assert {r["step"] for r in db.records} >= {6, 12, 18}
    assert resumed.history[-1]["n_minima"] == len(db) > first.history[-1]["n_minima"]
    assert "barrier_previous" in resumed.history[-1]  # to the minimum of step 12, from before the resume


@pytest.mark.slow
def test_a_resume_from_an_earlier_checkpoint_rolls_the_minima_back_to_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    settings = dict(every_n_epochs=1, at_fit_end=False, sampling={"replicas": 3, "steps": 5}, probe={"size": 32})
    settings.update(quench={"dedup_tol": 1e-3}, paths={"steps": 5, "max_paths": 2})

    def fit_epochs(epochs, energy, ckpt_path=None):
        pl.seed_everything(0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=CSVLogger(tmp_path),
            enable_progress_bar=False,
            callbacks=[energy, checkpoint],
        )
        trainer.fit(tiny_module_class()(), train_dataloaders=loader(), ckpt_path=ckpt_path)

    crashed = EnergyLandscape(**settings)
    fit_epochs(3, crashed)  # ran to step 18; the run resumes from the checkpoint of step 12
    abandoned = MinimaDatabase(crashed.minima_dir)
    before = [r for r in abandoned.records if r["first_step"] <= 12]
    assert len(before) < len(abandoned)  # the abandoned epoch found minima of its own
    resumed = EnergyLandscape(**settings)
    fit_epochs(3, resumed, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=12.ckpt")
    db = MinimaDatabase(resumed.minima_dir)
    # the minima found before the checkpoint, each kept (a later visit may only have lowered its loss)
    assert all(r["loss"] <= old["loss"] for r, old in zip(db.records, before, strict=False))
    assert [r["first_step"] for r in db.records[: len(before)]] == [r["first_step"] for r in before]
    # nothing of the abandoned timeline: the minima before the checkpoint, then only those the resumed run found
    assert len(db) == len(before) + resumed.history[-1]["new_minima"]
    assert all(r["first_step"] == 18 for r in db.records[len(before) :])
    assert len(MinimaDatabase(crashed.minima_dir)) == len(abandoned)  # the crashed run's folder is untouched


def test_minima_are_fingerprinted_with_outputs_fn(tmp_path):
    energy = EnergyLandscape(
        sampling={"replicas": 2, "steps": 5},
        paths={"steps": 5},
        probe={"size": 32, "outputs_fn": lambda module, batch: module(batch[0]).softmax(-1)},
    )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.callbacks.append(energy)
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    db = MinimaDatabase(energy.minima_dir)
    assert energy.failures == 0 and len(db) >= 1
    np.testing.assert_allclose(db.outputs(0).reshape(32, 3).sum(1), 1.0, rtol=1e-5)  # probabilities, not logits


@pytest.mark.slow
def test_energy_landscape_leaves_training_unchanged(tmp_path):
    plain = fit("lightning.pytorch", [], tmp_path / "plain")
    energy = EnergyLandscape(
        every_n_steps=3, sampling={"replicas": 2, "steps": 5}, paths={"steps": 5}, probe={"size": 32}
    )
    observed = fit("lightning.pytorch", [energy], tmp_path / "observed")
    assert_identical_runs(plain, observed)
    assert energy.runs == 4 and energy.failures == 0  # steps 3, 6, 9, 12 (fit end = step 12)


@pytest.mark.ddp
def test_two_ranks_sample_the_single_process_replicas_minima_and_paths(tmp_path):
    single = run_script("energy", tmp_path, 1)
    ddp = run_script("energy", tmp_path, 2)
    np.testing.assert_allclose(ddp["sketches"], single["sketches"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ddp["minima"], single["minima"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ddp["saddles"], single["saddles"], rtol=1e-4)
    assert ddp["history"]["replicas_run"] == single["history"]["replicas_run"] == 4
    # a second trigger after the first step: its chain holds both triggers; its restarted replica (the last, on rank 1
    # under DDP) starts at its origin, a replica's end of the first trigger or the recorder's snapshot of the initial
    # weights (where the first trigger started), chosen and broadcast alike on 1 and 2 ranks
    runs = [run_script("energy", tmp_path, 1, "chain"), run_script("energy", tmp_path, 2, "chain")]
    for run in runs:
        # 2 triggers of 4 replicas of 6 points, and the training path's one point so far (the initial weights)
        assert run["chain"]["chain_restarts"] == 1 and run["chain"]["chain_points"] == 8 * 6 + 1
        [(replica, step, origin)] = run["restarted_from"]
        assert (replica, step) == (3, 0)
        expected = run["sketches"][origin][-1] if origin >= 0 else run["sketches"][0][0]
        np.testing.assert_allclose(run["sketches"][7][0], expected, rtol=1e-6)
    assert runs[0]["restarted_from"] == runs[1]["restarted_from"]
    np.testing.assert_allclose(runs[1]["sketches"][7], runs[0]["sketches"][7], rtol=1e-5, atol=1e-6)


def test_bad_settings_are_rejected_naming_the_stage_and_field():
    with pytest.raises(ValueError, match=r"`sampling\.replicas`"):
        EnergyLandscape(sampling={"replicas": 0})
    with pytest.raises(ValueError, match=r"`sampling\.temperature`"):
        EnergyLandscape(sampling=SamplingConfig(temperature=-0.1))
    for momentum in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"`sampling\.momentum`"):
            EnergyLandscape(sampling={"momentum": momentum})
    with pytest.raises(ValueError, match=r"`msm\.features`"):
        EnergyLandscape(msm={"features": "weights"})
    with pytest.raises(ValueError, match=r"`budget\.seconds`"):
        EnergyLandscape(budget={"seconds": 0})
    with pytest.raises(ValueError, match=r"`paths\.images`"):
        EnergyLandscape(paths={"images": 2})
    with pytest.raises(ValueError, match=r"`quench\.dedup_tol`.*HINT"):
        EnergyLandscape(quench={"dedup_tol": 0.0})
    with pytest.raises(ValueError, match=r"`basins.merge_barrier`"):
        EnergyLandscape(basins={"merge_barrier": -1.0})
    with pytest.raises(ValueError, match=r"`sampling`.*replica_steps.*fields are replicas, steps"):
        EnergyLandscape(sampling={"replica_steps": 5})
    with pytest.raises(ValueError, match=r"`paths` must be a PathConfig"):
        EnergyLandscape(paths=5)


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [5e-4, 0.0])
def test_the_energy_is_the_trained_loss_with_the_optimizers_weight_decay_and_its_quenches_converge(
    tmp_path, weight_decay
):
    """A ReLU classifier on data it can fit: with the optimizer's weight decay in the energy, the quenches and paths
    converge (to the energy resolution: ReLU minima sit on kinks); without it the quenches run off, and the
    warning says why and what to set."""
    from lightning_landscape.examples import MLP, Classifier, GaussianMixtureClassification

    quench = {} if weight_decay else {"max_iter": 200}  # a quench that runs off takes all its iterations
    # without weight decay, replicas at plain lr 0.1: with training's momentum 0.9 the noise level is 10x, and the
    # quenches' energy resolution (a tenth of it) with it, at which this slow run-off already counts as converged
    sampling = {"replicas": 4, "steps": 50} if weight_decay else {"replicas": 4, "steps": 50, "momentum": 0.0}
    energy = EnergyLandscape(
        every_n_steps=16, at_fit_end=False, sampling=sampling, quench=quench, progress=False, probe={"size": 1024}
    )
    pl.seed_everything(0)
    model = Classifier(MLP(2, 4, [32, 32]), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    data = GaussianMixtureClassification(n_classes=4, separation=2.0, n_train=1024, n_val=64, batch_size=64)
    trainer = pl.Trainer(
        max_steps=16,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=[energy],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    if weight_decay:
        trainer.fit(model, datamodule=data)
    else:
        with pytest.warns(RuntimeWarning, match="Without weight decay.*quenches run off"):
            trainer.fit(model, datamodule=data)
    run = energy.history[0]
    assert energy.failures == 0 and run["quenches_run"] == 5
    assert MinimaDatabase(energy.minima_dir).meta["l2"] == weight_decay
    if weight_decay:
        assert run["quenches_converged"] == 5 and run["paths_converged"] == run["paths_run"]
    else:
        assert run["quenches_converged"] <= 2


class JumpingWell(DoubleWell):
    """The double well trained from x = -1.7 at lr 0.3: the first step jumps over the barrier into the right well,
    so training goes from the left well's set to the right one's."""

    def __init__(self) -> None:
        super().__init__()
        self.w.data = torch.tensor([-1.7, 0.0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


@pytest.mark.slow
def test_one_chain_of_all_triggers_gives_the_transition_from_the_initial_to_the_current_set(tmp_path):
    from lightning_landscape import TrajectoryStore
    from tests.potentials import smoluchowski_tpt_mfpt

    sampling = SamplingConfig(replicas=16, steps=1000, lr=0.01, temperature=0.25, record_every=5)
    energy = well_energy(every_n_steps=2, at_fit_end=False, sampling=sampling, paths={"max_paths": 0}, msm={"lag": 4})
    train([energy], tmp_path, model=JumpingWell(), max_steps=6)
    assert energy.failures == 0 and len(energy.history) == 3
    points = [h["chain_points"] for h in energy.history]
    # every trigger's replicas (16 of 201 points) join the one chain, and the training path's points so far (steps
    # 0 and 5, every record_every=5 steps; located, not counted: training steps at lr 0.3, the replicas at 0.01)
    assert points == [16 * 201 * k + n for k, n in ((1, 1), (2, 1), (3, 2))]
    assert all(h["chain_connected"] > 0.99 for h in energy.history)
    assert [h["chain_restarts"] for h in energy.history] == [0, 4, 4]  # a quarter from earlier ends after the first
    # a restarted replica starts where a replica of the trigger before ended
    folder = energy.reporter.run_dir / "excursions"
    ends = [TrajectoryStore.open(f).sketches[-1] for f in sorted((folder / "step-000000002").glob("replica-*"))]
    start = TrajectoryStore.open(folder / "step-000000004" / "replica-015").sketches[0]
    assert any(np.array_equal(start, end) for end in ends)
    # training went from the left well's set to the right well's: a transition with a rate, in replica steps of the
    # chain, of the order of the exact mean first-passage time between the wells' cores (|x| > 0.5)
    last = energy.history[-1]
    exact = smoluchowski_tpt_mfpt(lambda x: 0.5 * (x**2 - 1) ** 2, 0.25, core=0.5) / 0.01
    assert exact / 2 < last["chain_mfpt"] < 2 * exact
    assert energy.chain_transition["mfpt_steps"] == last["chain_mfpt"]
    assert energy.chain_transition["source_step"] == 0  # the initial weights lie in the left well's set
    assert energy.chain_transition["target_step"] == 6  # the current weights in the right one's
    # the training path's stages: the left well's set at step 0, the right well's from step 5 on
    stages = [(s["set"], s["first_step"]) for s in energy.chain_stages]
    assert stages == [(energy.chain_transition["source_set"], 0), (energy.chain_transition["target_set"], 5)]
    assert last["chain_stages"] == 2
    assert (energy.reporter.run_dir / "path_atlas-step0000006.png").exists()
    rows = (energy.reporter.run_dir / "pathways-step0000006.csv").read_text().splitlines()
    assert rows[0] == "sets,share" and float(rows[1].split(",")[1]) > 0.9  # one channel, over the barrier


@pytest.mark.slow
def test_replicas_restart_from_the_recorders_snapshots_least_visited_first(tmp_path):
    from lightning_landscape import TrajectoryRecorder

    sampling = SamplingConfig(replicas=8, steps=200, lr=0.01, temperature=0.25, record_every=5, restarts=0.25)
    energy = well_energy(every_n_steps=2, at_fit_end=False, sampling=sampling, paths={"max_paths": 0}, msm={"lag": 4})
    recorder = TrajectoryRecorder(sketch_dim=2, snapshot_every_n_steps=2)
    train([recorder, energy], tmp_path, model=JumpingWell(), max_steps=4)
    assert energy.failures == 0 and len(energy.history) == 2
    first, second = energy.history
    # the first trigger (step 2) has no earlier ends; the one snapshot before it is the initial weights (step 0)
    assert first["restarted_from"] == [[7, 0, -1]] and first["chain_restarts_snapshots"] == 1
    outputs = np.load(energy.reporter.run_dir / "excursions" / "step-000000002" / "outputs.npy")
    np.testing.assert_allclose(outputs[7, 0, :2], [-1.7, 0.0], rtol=1e-6)  # outputs are the weights themselves
    np.testing.assert_allclose(outputs[0, 0, :2], recorder.store.snapshot(2)[:2], rtol=1e-6)  # the rest at x0
    # the second (step 4): candidates are the 8 ends and the snapshots at steps 0 and 2; the initial weights, on the
    # left well's wall where training passed once and the replica restarted there slid down, are the least visited
    # (the last replica takes the least visited), an end of the trigger before comes next
    assert second["chain_restarts"] == 2 and second["restarted_from"][-1] == [7, 0, -1]
    assert second["restarted_from"][0][:2] == [6, 2] and second["restarted_from"][0][2] >= 0
    assert second["chain_restarts_snapshots"] == 1


class CorruptSnapshots(pl.Callback):
    """Overwrites the recorder's snapshots with garbage at step 2, before EnergyLandscape's trigger there."""

    def __init__(self, recorder) -> None:
        self.recorder = recorder

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            for snapshot in (self.recorder.store.path / "snapshots").glob("*.npy"):
                snapshot.write_bytes(b"not an array")


@pytest.mark.slow
def test_an_unreadable_snapshot_leaves_its_replica_at_the_current_point_and_the_trigger_standing(tmp_path):
    from lightning_landscape import TrajectoryRecorder

    sampling = SamplingConfig(replicas=8, steps=20, lr=0.01, temperature=0.25, record_every=5, restarts=0.25)
    energy = well_energy(every_n_steps=2, at_fit_end=False, sampling=sampling, paths={"max_paths": 0})
    recorder = TrajectoryRecorder(sketch_dim=2, snapshot_every_n_steps=2)
    with pytest.warns(RuntimeWarning, match="could not read the snapshot of step 0"):
        train([recorder, CorruptSnapshots(recorder), energy], tmp_path, model=JumpingWell(), max_steps=2)
    assert energy.failures == 0 and energy.runs == 1
    assert energy.history[0]["restarted_from"] == [] and energy.history[0]["chain_restarts"] == 0


class SlidingWell(DoubleWell):
    """The double well trained from (-0.3, 0.5) at the replicas' lr: training slides down into the left well."""

    def __init__(self) -> None:
        super().__init__()
        self.w.data = torch.tensor([-0.3, 0.5])


class Weights(pl.Callback):
    def __init__(self) -> None:
        self.at: dict[int, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.at[0] = pl_module.w.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.at[trainer.global_step] = pl_module.w.detach().clone()


def fragments(energy, trainer):
    """The training path's pieces as the next trigger would cut them."""
    return energy.chain.path.fragments(energy._replica_rule(trainer), energy.sampling.record_every)


@pytest.mark.slow
def test_the_training_path_joins_the_chain_every_record_every_steps(tmp_path):
    sampling = SamplingConfig(replicas=4, steps=100, lr=0.01, temperature=0.05, record_every=5)
    energy = well_energy(every_n_steps=20, at_fit_end=False, sampling=sampling, paths={"max_paths": 0})
    weights = Weights()
    trainer = train([weights, energy], tmp_path, model=SlidingWell(), max_steps=40)
    assert energy.failures == 0 and len(energy.history) == 2
    steps = list(range(0, 41, 5))
    assert energy.chain.path.steps == steps
    # the path's features are its outputs on the probe set (here the weights, one row per probe sample) at the
    # chain's coordinates, recorded at the weights of that step, before the trigger of that step
    for step, features in zip(steps, energy.chain.path.features, strict=True):
        outputs = weights.at[step].expand(16, 2).reshape(-1).numpy()
        np.testing.assert_allclose(features, outputs[energy.chain.columns], rtol=1e-6)
    saved = np.load(energy.reporter.run_dir / "excursions" / "training-path.npz")
    assert saved["steps"].tolist() == steps and saved["features"].shape == (9, 32)
    # plain SGD at the replicas' lr: one trajectory whose transitions count; its stages cover all its points
    assert fragments(energy, trainer) == [list(range(9))]
    assert energy.history[-1]["chain_points"] == 2 * 4 * 21 + 9
    stages = energy.chain_stages
    assert stages[0]["first_step"] == 0 and stages[-1]["last_step"] == 40 and sum(s["points"] for s in stages) == 9
    # another learning rate: its points are located in the chain, one by one, not counted
    energy.sampling.lr = 0.02
    assert fragments(energy, trainer) == [[i] for i in range(9)]
    # the replicas take training's heavy-ball momentum by default; the path's points keep the rule training stepped
    # with when they were recorded (plain SGD at 0.01), so they link only while the replicas step that way too
    energy.sampling.lr = None
    group = trainer.optimizers[0].param_groups[0]
    group["momentum"] = 0.9
    assert energy._replica_rule(trainer) == (0.01, 0.9) and fragments(energy, trainer) == [[i] for i in range(9)]
    energy.sampling.momentum = 0.0
    assert energy._replica_rule(trainer) == (0.01, 0.0) and fragments(energy, trainer) == [list(range(9))]
    energy.sampling.momentum, group["nesterov"] = None, True
    assert energy._replica_rule(trainer) == (0.01, 0.0)  # Nesterov is not a replica's rule: plain SGD replicas
    trainer.strategy._optimizers = [torch.optim.Adam(trainer.lightning_module.parameters(), lr=0.01)]
    assert energy._replica_rule(trainer) == (0.01, 0.0)  # another optimizer: plain SGD at its lr


class MomentumWell(SlidingWell):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def test_replicas_step_with_trainings_momentum(tmp_path):
    from lightning_landscape import TrajectoryStore

    sampling = SamplingConfig(replicas=2, steps=20, record_every=5)
    energy = well_energy(every_n_steps=10, at_fit_end=False, sampling=sampling, paths={"max_paths": 0})
    trainer = train([energy], tmp_path, model=MomentumWell(), max_steps=10)
    assert energy.failures == 0 and len(energy.history) == 1
    store = TrajectoryStore.open(energy.reporter.run_dir / "excursions" / "step-000000010" / "replica-000")
    assert (store.meta["lr"], store.meta["momentum"]) == (0.01, 0.9)
    assert fragments(energy, trainer) == [[0, 1, 2]]  # steps 0, 5, 10: momentum SGD's path counts


class ScheduledWell(SlidingWell):
    """Plain SGD whose lr halves after step 10 (a per-step schedule)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 10 else 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_learning_rate_schedule_breaks_the_counted_path_where_the_rule_changed(tmp_path):
    sampling = SamplingConfig(replicas=2, steps=20, record_every=5)
    energy = well_energy(every_n_steps=20, at_fit_end=False, sampling=sampling, paths={"max_paths": 0})
    trainer = train([energy], tmp_path, model=ScheduledWell(), max_steps=20)
    assert energy.failures == 0 and energy.chain.path.steps == [0, 5, 10, 15, 20]
    # the replicas step at the current lr 0.005; the points from step 10 on were recorded at it (the lr of the step
    # after them), the earlier ones at 0.01: located, not counted
    assert energy._replica_rule(trainer) == (0.005, 0.0)
    assert fragments(energy, trainer) == [[0], [1], [2, 3, 4]]


@pytest.mark.slow
def test_a_chain_of_replicas_at_two_learning_rates_says_it_mixes_dynamics(tmp_path):
    sampling = SamplingConfig(replicas=2, steps=20, record_every=5)
    energy = well_energy(every_n_steps=8, at_fit_end=False, sampling=sampling, paths={"max_paths": 0})
    with pytest.warns(RuntimeWarning, match=r"mixes replicas of 2 step rules \(\(lr, momentum\) first seen at steps"):
        train([energy], tmp_path, model=ScheduledWell(), max_steps=16)  # triggers at lr 0.01 (step 8), 0.005 (16)
    assert energy.failures == 0 and len(energy.history) == 2
    import warnings

    constant = well_energy(every_n_steps=8, at_fit_end=False, sampling=sampling, paths={"max_paths": 0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train([constant], tmp_path / "constant", model=SlidingWell(), max_steps=16)
    assert len(constant.history) == 2 and not any("mixes replicas" in str(w.message) for w in caught)
