"""The observer must not disturb: training with heavy analyses every step equals training without them.

Runs on both Lightning namespaces (``lightning.pytorch`` and ``pytorch_lightning``) with one callback class.
"""

import csv
import warnings

import pytest

from tests.helpers import NAMESPACES, DisturbingAnalysis, assert_identical_runs, fit


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_heavy_analyses_every_step_leave_training_bit_identical(tmp_path, namespace, optimizer):
    plain = fit(namespace, [], tmp_path / "plain", optimizer)
    callback = DisturbingAnalysis()
    observed = fit(namespace, [callback], tmp_path / "observed", optimizer)
    assert_identical_runs(plain, observed)
    # it really ran: before each of the 12 optimizer steps, after each step, and at the end (deduplicated)
    assert callback.runs == 12 + 1 and callback.failures == 0
    with open(f"{observed[1].logger.log_dir}/metrics.csv") as fh:
        assert "landscape-disturb/probe_loss" in next(csv.reader(fh))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_failing_analysis_warns_records_and_training_goes_on(tmp_path, namespace):
    plain = fit(namespace, [], tmp_path / "plain")
    callback = DisturbingAnalysis(fail=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        observed = fit(namespace, [callback], tmp_path / "observed")
    assert_identical_runs(plain, observed)
    assert callback.failures == 13 and callback.runs == 0
    assert any("failed at step" in str(w.message) and "exploded" in str(w.message) for w in caught)
    assert callback.reporter.run_dir.name == "disturb"
    lines = (callback.reporter.run_dir / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 13 and "analysis exploded on purpose" in lines[0]
