"""``lightning-landscape analyze``: two recorded runs of the double well analyzed together."""

import json

import numpy as np
import pytest

from lightning_landscape import TrajectoryRecorder
from lightning_landscape.cli import main
from tests.test_energy import train, well_energy


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    for seed in (0, 1):
        energy = well_energy(replicas=4, replica_steps=300, max_paths=0, seed=seed)
        train([TrajectoryRecorder(sketch_dim=16, sketch_every_n_steps=1), energy], root / f"run-{seed}", max_steps=8)
    config = root / "double_well.yaml"
    config.write_text("model:\n  class_path: tests.test_energy.DoubleWell\ntrainer:\n  accelerator: cpu\n")
    return root, config


def test_analyze_merges_runs_and_finds_the_saddle_between_their_minima(two_runs):
    root, config = two_runs
    out = root / "analysis"
    main(
        [
            "analyze",
            str(root / "run-0"),
            str(root / "run-1"),
            "--config",
            str(config),
            "--out",
            str(out),
            "--path-steps",
            "400",
            "--path-lr",
            "0.02",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trajectories"] == 2 * (1 + 4)  # each run's training trajectory and its 4 replicas
    assert summary["minima"] == 2  # the wells, found in both runs and merged in function space
    assert summary["paths_computed"] == 1 and summary["known_saddles"] == 1  # no run computed a path itself
    saved = np.load(out / "analysis.npz")
    assert saved["saddles"][0, 1] == pytest.approx(0.5, rel=1e-3)  # the saddle of the double well, from analyze
    np.testing.assert_allclose(saved["minima_losses"], 0.0, atol=1e-8)
    assert summary["metastable_states"] >= 2 and summary["active_points"] > 0
    for name in ("disconnectivity", "timescales", "paths", "free_energy"):
        assert (out / f"{name}.png").exists(), name
    runs = {line.split(",")[2] for line in (out / "minima.csv").read_text().splitlines()[1:]}
    assert runs <= {"run-0", "run-1"}


def test_analyze_without_records_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="No trajectory store"):
        main(["analyze", str(tmp_path)])
