"""``lightning-landscape analyze``: two recorded runs of the double well analyzed together."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_landscape import TrajectoryRecorder
from lightning_landscape.cli import main
from lightning_landscape.energy import SamplingConfig
from tests.potentials import train, well_energy


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    for seed in (0, 1):
        sampling = SamplingConfig(replicas=4, steps=300, lr=0.01, temperature=0.5, record_every=5, seed=seed)
        energy = well_energy(sampling=sampling, paths={"max_paths": 0})
        train([TrajectoryRecorder(sketch_dim=16, sketch_every_n_steps=1), energy], root / f"run-{seed}", max_steps=8)
    config = root / "double_well.yaml"
    config.write_text("model:\n  class_path: tests.potentials.DoubleWell\ntrainer:\n  accelerator: cpu\n")
    return root, config


@pytest.mark.slow
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
    assert summary["connected"] == summary["active_points"] / summary["points"]
    assert ("disconnected" in summary) == (summary["connected"] < 0.9)  # said in words when it is
    assert "transition" in summary  # TPT of the training paths, or why there is none
    # one chain of both runs on the probe outputs: 4 replicas of 61 points and the training path (steps 0, 5) each;
    # the runs' replicas meet in function space (their clouds hop between the same two wells)
    chain = summary["chain"]
    assert chain["points"] == 2 * (4 * 61 + 2) and chain["connected"] > 0.9 and chain["sets"] >= 2
    assert sorted(Path(run).name for run in chain["stages"]) == ["run-0", "run-1"]
    assert all(stages[0]["first_step"] == 0 and stages[-1]["last_step"] == 5 for stages in chain["stages"].values())
    assert chain["step_rules"] == [[0.01, 0.0]]  # both runs' replicas step alike: one dynamics
    for name in ("disconnectivity", "timescales", "paths", "free_energy"):
        assert (out / f"{name}.png").exists(), name
    with (out / "minima.csv").open() as fh:
        minima = list(csv.DictReader(fh))
    assert {row["run"] for row in minima} <= {"run-0", "run-1"}
    assert all(row["certified"] == "True" for row in minima)  # the certificates travel with the merged minima
    # the basins at the runs' own level (0.1 < the barrier 0.5): the two wells; both barriers in barriers.csv
    assert summary["merge_barrier"] == pytest.approx(0.1) and summary["basins"] == 2
    assert len((out / "basins.csv").read_text().splitlines()) == 3
    header, row = (out / "barriers.csv").read_text().splitlines()[:2]
    assert header.startswith("i,j,saddle,barrier_ij,barrier_ji,method,converged")
    assert float(row.split(",")[3]) == pytest.approx(0.5, rel=1e-3) == float(row.split(",")[4])
    one = root / "analysis-one-basin"  # above the barrier the wells are one basin, joined by a straight line
    args = ["analyze", str(root / "run-0"), str(root / "run-1"), "--config", str(config), "--out", str(one)]
    summary = main([*args, "--merge-barrier", "0.6"])
    assert summary["basins"] == 1 and summary["linear_joins"] == 1 and summary["paths_computed"] == 0


def test_analyze_without_records_says_what_to_pass_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No trajectory store" in err and "HINT" in err


def test_a_missing_run_dir_is_refused_and_not_created(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["analyze", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()
    assert "is not a directory" in capsys.readouterr().err


def copy_runs(two_runs, tmp_path):
    import shutil

    root, config = two_runs
    for name in ("run-0", "run-1"):
        shutil.copytree(root / name, tmp_path / name)
    return config


@pytest.mark.slow
def test_rerunning_into_the_same_out_replaces_the_merged_database(two_runs, tmp_path):
    copy_runs(two_runs, tmp_path)
    args = ["analyze", str(tmp_path / "run-0"), str(tmp_path / "run-1"), "--out", str(tmp_path / "out")]
    first = main(args)
    second = main(args)
    assert first["minima"] == second["minima"] == 2
    visits = [r["visits"] for r in json.loads((tmp_path / "out" / "minima" / "minima.json").read_text())["minima"]]
    first_visits = sum(visits)
    main(args)
    visits = [r["visits"] for r in json.loads((tmp_path / "out" / "minima" / "minima.json").read_text())["minima"]]
    assert sum(visits) == first_visits  # not added up again on every re-run


@pytest.mark.slow
def test_corrupt_records_are_left_out_by_name_and_the_other_stages_still_run(two_runs, tmp_path):
    copy_runs(two_runs, tmp_path)
    chunk = next((tmp_path / "run-0").rglob("chunks/*.npz"))
    chunk.write_bytes(b"not a zip file")
    (tmp_path / "run-1" / "stray").mkdir()
    (tmp_path / "run-1" / "stray" / "meta.json").write_text("{}")  # some other tool's meta.json: ignored
    index = next((tmp_path / "run-1").rglob("minima.json"))
    index.write_text("{not json")
    summary = main(["analyze", str(tmp_path / "run-0"), str(tmp_path / "run-1"), "--out", str(tmp_path / "out")])
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert any(str(chunk) in r for r in reasons.values())  # the corrupt chunk, by its file name
    assert any(str(index) in r for r in reasons.values())  # the corrupt database, by its file name
    assert summary["minima"] == 2 and summary["trajectories"] >= 5  # the rest was analyzed
    assert summary["errors"] == {}


@pytest.mark.slow
def test_a_config_of_another_model_is_one_clear_line(two_runs, tmp_path, capsys):
    copy_runs(two_runs, tmp_path)
    config = tmp_path / "other.yaml"
    config.write_text(
        "model:\n  class_path: lightning_landscape.examples.Classifier\n"
        "  init_args:\n    network:\n      class_path: lightning_landscape.examples.MLP\n"
        "      init_args: {in_features: 2, out_features: 2, hidden: [4]}\n"
        "data:\n  class_path: lightning_landscape.examples.GaussianMixtureClassification\n"
    )
    with pytest.raises(SystemExit):
        main(["analyze", str(tmp_path / "run-0"), str(tmp_path / "run-1"), "--config", str(config)])
    err = capsys.readouterr().err
    assert "builds a model with" in err and "HINT: pass the config the runs were trained with" in err


@pytest.mark.slow
def test_analyzes_chain_lists_the_step_rules_of_runs_at_two_learning_rates(two_runs, tmp_path):
    from lightning_landscape.analysis import analyze

    root, _ = two_runs
    sampling = SamplingConfig(replicas=4, steps=50, lr=0.02, temperature=0.5, record_every=5)
    train([well_energy(sampling=sampling, paths={"max_paths": 0})], tmp_path / "fast", max_steps=8)
    summary = analyze([root / "run-0", tmp_path / "fast"], tmp_path / "analysis")
    assert summary["chain"]["step_rules"] == [(0.01, 0.0), (0.02, 0.0)]  # a chain of a mixture of two dynamics


@pytest.mark.slow
def test_analyze_reports_the_training_transition_of_a_known_chain(tmp_path):
    """Stores whose sketches follow a known 3-state chain (wells at x = 0, 5, 10): the training path goes from the
    first well to the last, the replicas sample all three. The MFPT from the first set to the last is the exact
    mean hitting time of the chain (a linear solve), within the sampling error."""
    from lightning_landscape.dynamics import TrajectoryStore

    T = np.array([[0.96, 0.04, 0.0], [0.04, 0.92, 0.04], [0.0, 0.04, 0.96]])
    rng = np.random.default_rng(0)
    meta = {"k": 2, "projection_seed": 0, "nnz": 1, "n_params": 2}

    def write(path, states):
        store = TrajectoryStore.create(path, meta)
        for step, s in enumerate(states):
            store.append(step, {"loss": float(s)}, sketch=np.array([5.0 * s, 0.0]) + 0.3 * rng.standard_normal(2))
        store.flush()

    def chain(start, n):
        states = [start]
        for _ in range(n - 1):
            states.append(int(rng.choice(3, p=T[states[-1]])))
        return states

    training = chain(0, 400)
    while training[-1] != 2:  # a training path that ends in the last well
        training.append(int(rng.choice(3, p=T[training[-1]])))
    write(tmp_path / "run" / "trajectory", training)
    for r in range(12):
        write(tmp_path / "run" / "energy" / "excursions" / "step-1" / f"replica-{r:03d}", chain(r % 3, 2000))
    summary = main(["analyze", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--clusters", "6"])
    transition = summary["transition"]
    assert summary["metastable_states"] == 3
    assert transition["source_set"] != transition["target_set"]
    hitting = np.linalg.solve(np.eye(2) - T[:2, :2], np.ones(2))[0]  # m = 1 + T m off the last state
    assert transition["mfpt_steps"] == pytest.approx(hitting, rel=0.25)
    top = transition["pathways"][0]
    assert top["sets"][0] == transition["source_set"] and top["sets"][-1] == transition["target_set"]
    assert len(top["sets"]) == 3 and top["share"] == pytest.approx(1.0, abs=0.02)  # one channel, through the middle
    assert (tmp_path / "out" / "path_atlas.png").stat().st_size > 1000


def test_analyze_says_in_words_when_its_msm_is_disconnected(tmp_path):
    """Two runs that stay in regions of parameter space far apart: their points never meet, so the MSM's largest
    connected set holds one run's points, about half, and the summary says so."""
    from lightning_landscape.dynamics import TrajectoryStore

    rng = np.random.default_rng(0)
    meta = {"k": 2, "projection_seed": 0, "nnz": 1, "n_params": 2}
    runs = []
    for run, center in (("run-a", 0.0), ("run-b", 100.0)):
        for piece in range(3):
            store = TrajectoryStore.create(tmp_path / run / f"trajectory-{piece}", meta)
            for step in range(200):
                store.append(step, {"loss": 1.0}, sketch=np.array([center, 0.0]) + rng.standard_normal(2))
            store.flush()
        runs.append(str(tmp_path / run))
    summary = main(["analyze", *runs, "--out", str(tmp_path / "out"), "--clusters", "6"])
    assert summary["points"] == 1200 and summary["connected"] == pytest.approx(0.5, abs=0.05)
    assert summary["disconnected"].startswith("only 50% of the points lie in the largest connected set")


def console(*args, cwd):
    script = Path(sys.executable).with_name("lightning-landscape")  # the console script pip installed
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_the_console_script_exits_0_with_nothing_on_stderr_and_2_with_one_line_per_bad_option(two_runs, tmp_path):
    root, _ = two_runs
    done = console("analyze", str(root / "run-0"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout)["trajectories"] == 5  # the summary, on stdout
    done = console("dashboard", "--entity", "e", "--project", "p", "--offline", "--out", "spec.json", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "" and (tmp_path / "spec.json").exists()
    for option, value, named in [
        ("--lag", "0", "`--lag`"),
        ("--clusters", "-1", "`--clusters`"),
        ("--path-images", "2", "`--path-images`"),
        ("--config", str(tmp_path / "missing.yaml"), "`--config`"),
        ("--lag", "one", "--lag"),
    ]:
        done = console("analyze", str(root / "run-0"), option, value, cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


@pytest.mark.slow
def test_one_recorded_run_gives_the_same_tables_online_and_offline(tmp_path):
    """The callback's last trigger and `analyze` of its run write the minima, basins and barriers with the same
    functions (energy.result): the same columns and, for one run, the same rows; `analyze` adds the run's name."""
    sampling = SamplingConfig(replicas=4, steps=300, lr=0.01, temperature=0.5, record_every=5)
    energy = well_energy(sampling=sampling)
    train([energy], tmp_path / "run-0", max_steps=8)
    assert energy.failures == 0 and energy.history[-1]["n_minima"] == 2 and energy.history[-1]["paths_run"] == 1
    out = tmp_path / "offline"
    summary = main(["analyze", str(tmp_path / "run-0"), "--out", str(out)])
    assert summary["errors"] == {} and summary["basins"] == 2
    online = energy.reporter.run_dir
    for name in ("minima", "basins", "barriers"):
        columns, rows = read_table(online / f"{name}-step0000008.csv")
        offline_columns, offline_rows = read_table(out / f"{name}.csv")
        assert offline_columns == columns, name
        assert len(rows) == len(offline_rows) > 0, name
        for row, offline_row in zip(rows, offline_rows, strict=True):
            if name == "minima":
                assert row.pop("run") == "" and offline_row.pop("run") == "run-0"
            assert offline_row == row, name
    # the metastable sets of this trigger's replicas and of the recorded trajectories: one table shape
    assert read_table(online / "metastable-step0000008.csv")[0] == read_table(out / "metastable.csv")[0]
