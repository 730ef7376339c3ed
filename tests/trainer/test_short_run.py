"""A run shorter than training.logEvery logs no step: the stage must still finish and
publish its adapter (it failed copying a metrics file that was never written; found by the
long-context benchmark, issue 16, whose 8-step runs logged every 10)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer


def test_run_shorter_than_log_every_publishes_its_adapter(train_config):
    from kubetune.trainer import train

    cfg = train_config(training={"maxSteps": 2, "logEvery": 5, "checkpointEvery": 100},
                       dataset={"validationSplit": 0.0})
    result = train.run_train(cfg)
    assert result.exit_code == 0 and result.global_step == 2
    assert result.adapter_uri and result.adapter_uri.endswith("/adapter/")
