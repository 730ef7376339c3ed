"""`kubetune status` text (pure)."""

from kubetune.operator.describe import describe


def test_describe_a_serving_job():
    text = describe({
        "metadata": {"name": "bot", "namespace": "team-a", "generation": 2},
        "status": {
            "phase": "Serving", "observedGeneration": 1, "message": "serving",
            "progress": {"step": 50, "totalSteps": 100, "percent": 50, "loss": 1.234567,
                         "lastCheckpoint": {"step": 40, "uri": "s3://a/checkpoints/step-00000040"}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "DeploymentAvailable", "message": "ok"}],
            "artifacts": {"merged": "s3://a/merged/"},
            "endpoint": {"url": "http://bot-serve.team-a.svc:8000/v1", "model": "bot"},
        },
    })
    assert "FineTuneJob team-a/bot" in text
    assert "phase:      Serving" in text
    assert "step 50/100, 50%, loss 1.235" in text
    assert "checkpoint: step 40 s3://a/checkpoints/step-00000040" in text
    assert "Ready      True     DeploymentAvailable: ok" in text
    assert "merged            s3://a/merged/" in text
    assert "endpoint:   http://bot-serve.team-a.svc:8000/v1 (model bot)" in text
    assert "spec generation 2, last reconciled 1" in text


def test_describe_a_new_job():
    assert "(not reconciled yet)" in describe({"metadata": {"name": "x", "namespace": "n"}})
