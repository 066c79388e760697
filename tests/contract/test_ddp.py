"""Real 2-process DDP (gloo, CPU) against a single process on the same probe set."""

import numpy as np
import pytest

from tests.ddp import run_script


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return run_script("sharded_objective", tmp, 1), run_script("sharded_objective", tmp, 2)


@pytest.mark.ddp
def test_sharded_probe_set_gives_the_single_process_objective(results):
    single, ddp = results
    assert single["world"] == 1 and ddp["world"] == 2
    assert single["n_total"] == ddp["n_total"] == 64
    np.testing.assert_allclose(ddp["loss"], single["loss"], rtol=1e-6)
    for key in ("grad", "hvp", "losses"):
        np.testing.assert_allclose(ddp[key], single[key], rtol=1e-5, atol=1e-6)


@pytest.mark.ddp
def test_uneven_shards_are_gathered_in_rank_order(results):
    ddp = results[1]
    for r in results:
        np.testing.assert_allclose(r["gathered"], r["expected_gathered"], rtol=1e-5, atol=1e-6)
    assert len(ddp["gathered"]) == 7
    assert ddp["broadcast"] == "from rank 0"


@pytest.mark.ddp
def test_flatness_monitor_on_two_ranks_equals_one_process(tmp_path):
    single = run_script("flatness", tmp_path, 1)
    ddp = run_script("flatness", tmp_path, 2)
    assert (single["world"], ddp["world"]) == (1, 2)
    a, b = single["history"][0], ddp["history"][0]
    for key in ("lambda_max", "lambda_2", "lambda_3", "lambda_min", "sam_sharpness", "grad_noise_trace", "b_simple"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(b["trace"], a["trace"], rtol=1e-4)  # same random vectors, drawn on rank 0
    assert ddp["published"] == pytest.approx(b["lambda_max"], rel=1e-6)


@pytest.mark.ddp
def test_flatness_monitor_under_fsdp2_gathers_the_parameters_and_equals_one_process(tmp_path):
    """Two ranks of ModelParallelStrategy with ``fully_shard``: every rank holds half of each weight; the monitor
    gathers them, evaluates with FSDP's hooks suspended, and measures what one process measures on the whole model
    (same weights at step 0, same probe set). The shards, the weights and the training step are left as they were."""
    single = run_script("flatness", tmp_path, 1)
    fsdp = run_script("fsdp", tmp_path, 2)
    assert fsdp["world"] == 2 and fsdp["failures"] == 0 and fsdp["steps"] == 1
    assert fsdp["sharded"] and fsdp["sharded_after_training"] and fsdp["unchanged"]
    assert fsdp["local"] == [12, 4, 4, 4, 16, 2]  # half of each parameter (Linear 3-8, BatchNorm 8, Linear 8-3)
    a, b = single["history"][0], fsdp["history"][0]
    for key in ("lambda_max", "lambda_2", "lambda_3", "lambda_min", "trace", "sam_sharpness", "grad_noise_trace"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
    assert fsdp["published"] == pytest.approx(b["lambda_max"], rel=1e-6)
    assert "75 parameters" in fsdp["refusal"] and "HINT" in fsdp["refusal"]  # a model too large to gather
    assert "tensor-parallel layers" in fsdp["tensor_parallel"] and "HINT" in fsdp["tensor_parallel"]


@pytest.mark.ddp
def test_a_failure_on_a_serving_rank_neither_hangs_nor_stops_training(tmp_path):
    result = run_script("flatness", tmp_path, 2, "fail", timeout=180)
    assert result["steps"] == 1  # training went on, and the processes finished (no hang)
    assert result["failures"] == 1 and result["history"] == []  # rank 0 recorded the failed analysis


@pytest.mark.ddp
@pytest.mark.parametrize(("callback", "expected_runs"), [("flatness", 1), ("landscape", 1), ("energy", 2)])
def test_a_one_rank_failure_in_any_stage_makes_every_rank_skip_without_hanging(tmp_path, callback, expected_runs):
    from tests.scripts.faults import FAULTS

    result = run_script("faults", tmp_path, 2, callback, timeout=240)
    faults = FAULTS[callback]
    skipped = sum(1 for _, path, _ in faults if path != "markov_model")  # a failed MSM leaves the trigger standing
    assert result["steps"] == len(faults) + 1  # training went on to the end
    assert result["failures"] == [skipped, skipped]  # both ranks skipped each failed trigger together
    assert result["runs"] == [expected_runs, expected_runs]  # and ran the last one
    records = [r for r in result["records"] if '"step"' in r]
    rank_one = [f for f in faults if f[2] == 1]
    assert len(records) >= skipped and sum("rank 1: RuntimeError: injected fault" in r for r in records) >= len(
        [f for f in rank_one if f[1] != "markov_model"]
    )  # failures of rank 1 are visible on rank 0


@pytest.mark.ddp
def test_a_one_sample_probe_batch_under_batchnorm_training_mode_is_refused_on_every_rank(tmp_path):
    result = run_script("faults", tmp_path, 2, "batchnorm", timeout=240)
    assert result["steps"] == 0 and "probe.size" in result["error"] and "1 sample" in result["error"]
