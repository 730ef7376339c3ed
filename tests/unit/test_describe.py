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


def test_describe_shows_the_revision_history_and_which_one_serves():
    out = describe({
        "metadata": {"name": "bot", "namespace": "ns", "generation": 3},
        "status": {
            "phase": "Serving", "observedGeneration": 3, "servingRevision": "bbbbbbbbbb",
            "endpoint": {"url": "http://bot-serve.ns.svc:8000/v1", "model": "bot"},
            "revisions": [
                {"id": "aaaaaaaaaa", "generation": 1, "phase": "Succeeded", "servedFrom": "2026-12-01T10:00:00Z",
                 "servedUntil": "2026-12-01T12:00:00Z", "artifacts": {"merged": "s3://a/bot/revisions/aaaaaaaaaa/merged/"},
                 "evaluation": {"message": "held-out loss 2.0 -> 1.5"}},
                {"id": "bbbbbbbbbb", "generation": 2, "phase": "Succeeded", "servedFrom": "2026-12-01T12:00:00Z"},
                {"id": "cccccccccc", "generation": 3, "phase": "Failed",
                 "evaluation": {"message": "held-out loss 2.0 -> 2.1; gate failed"}},
            ],
        },
    })
    assert "(model bot, revision bbbbbbbbbb)" in out
    lines = out.splitlines()
    a = next(line for line in lines if "aaaaaaaaaa" in line and "gen" in line)
    b = next(line for line in lines if "bbbbbbbbbb" in line and "gen" in line)
    c = next(line for line in lines if "cccccccccc" in line)
    assert "served 2026-12-01T10:00:00Z .. 2026-12-01T12:00:00Z" in a and "2.0 -> 1.5" in a
    assert b.lstrip().startswith("*") and "served 2026-12-01T12:00:00Z .. now" in b
    assert "Failed" in c and "gate failed" in c and "served" not in c
    assert "s3://a/bot/revisions/aaaaaaaaaa/merged/" in out
