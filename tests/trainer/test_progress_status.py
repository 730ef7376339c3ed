"""Progress lines, throttled status patches that never crash training, compact termination messages."""

from __future__ import annotations

import json
import socket


from kubetune.trainer.kubestatus import GROUP, MERGE_PATCH, PLURAL, VERSION, StatusPatcher, job_from_env, progress_patch
from kubetune.trainer.progress import ProgressReporter, RateMeter, format_line, read_metrics, truncate_metrics
from kubetune.trainer.termination import MAX_BYTES, build_message, write_message


class RecordingApi:
    """Stands in for CustomObjectsApi only where the test must see the exact call made."""

    def __init__(self):
        self.calls = []

    def patch_namespaced_custom_object_status(self, **kwargs):
        self.calls.append(kwargs)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_patches_are_throttled_and_latest_wins():
    api, clock = RecordingApi(), Clock()
    p = StatusPatcher("job", "ns", min_interval=5, api_factory=lambda: api, clock=clock)
    assert p.update({"step": 1}) is True
    clock.now = 1
    assert p.update({"step": 2}) is False
    clock.now = 2
    assert p.update({"step": 3, "loss": None}) is False
    clock.now = 6
    assert p.update({"step": 4, "loss": 1.5}) is True
    assert [c["body"]["status"]["progress"] for c in api.calls] == [{"step": 1}, {"step": 4, "loss": 1.5}]
    call = api.calls[0]
    assert (call["group"], call["version"], call["plural"], call["namespace"], call["name"]) == (GROUP, VERSION, PLURAL, "ns", "job")
    assert call["_content_type"] == MERGE_PATCH
    clock.now = 7
    p.update({"step": 5})
    assert p.flush() is True and api.calls[-1]["body"]["status"]["progress"] == {"step": 5}


def test_unreachable_api_server_never_raises():
    """A real kubernetes client pointed at a closed loopback port: failures are counted, not raised."""
    from kubernetes import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends

    def api():
        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{port}"
        conf.retries = 0
        return client.CustomObjectsApi(client.ApiClient(conf))

    p = StatusPatcher("job", "ns", min_interval=0, api_factory=api)
    assert p.update({"step": 1}) is False
    assert p.update({"step": 2}) is False
    assert p.failures == 2 and p.sent == 0

    def broken_config():
        raise RuntimeError("no kubeconfig")

    q = StatusPatcher("job", "ns", min_interval=0, api_factory=broken_config)
    assert q.update({"step": 1}) is False and q.failures == 1


def test_job_from_env(monkeypatch):
    monkeypatch.delenv("KUBETUNE_JOB_NAME", raising=False)
    monkeypatch.delenv("KUBETUNE_JOB_NAMESPACE", raising=False)
    assert job_from_env() is None
    assert job_from_env("a", "b") == ("a", "b")
    monkeypatch.setenv("KUBETUNE_JOB_NAME", "from-env")
    monkeypatch.setenv("KUBETUNE_JOB_NAMESPACE", "team")
    assert job_from_env("a", "b") == ("from-env", "team")
    assert progress_patch({"step": 1, "evalLoss": None}) == {"status": {"progress": {"step": 1}}}


def test_reporter_writes_metrics_and_patches(tmp_path, capsys):
    api, clock = RecordingApi(), Clock()
    rep = ProgressReporter(tmp_path / "metrics.jsonl", None,
                           StatusPatcher("job", "ns", min_interval=5, api_factory=lambda: api, clock=clock), tty=False)
    rep.start(0, 10)
    rep.record(1, 10, 0.1, {"loss": 2.5, "learning_rate": 1e-3}, tokens=100)
    rep.record(2, 10, 0.2, {"loss": 2.0, "learning_rate": 1e-3}, tokens=200)
    rep.checkpoint(2, "s3://b/out/checkpoints/step-00000002/")
    rep.close()
    out = capsys.readouterr().out
    assert "step 1/10 | epoch 0.10 | loss 2.5000 | lr 1.00e-03" in out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 2.0
    progress = api.calls[-1]["body"]["status"]["progress"]
    assert progress["step"] == 2 and progress["lastCheckpoint"]["step"] == 2 and "updatedAt" in progress
    truncate_metrics(tmp_path / "metrics.jsonl", 1)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_rate_meter_and_line():
    m = RateMeter(start_time=0.0, start_step=10, start_tokens=1000)
    assert m.tokens_per_second(3000, now=4.0) == 500.0
    assert m.eta_seconds(20, 30, now=5.0) == 5  # 0.5 s/step, 10 steps left
    assert m.eta_seconds(10, 30, now=5.0) is None
    line = format_line({"step": 3, "totalSteps": 9, "epoch": 0.5, "evalLoss": 1.25, "etaSeconds": 125})
    assert line == "step 3/9 | epoch 0.50 | eval_loss 1.2500 | eta 2m05s"


def test_termination_message_always_fits(tmp_path, monkeypatch):
    errors = [{"row": i, "field": "messages[1].content", "message": "empty assistant reply " * 3} for i in range(500)]
    text = build_message("validate", False, "InvalidRows", "x" * 10000, errors=errors)
    assert len(text.encode()) < MAX_BYTES
    obj = json.loads(text)
    assert obj["stage"] == "validate" and obj["reason"] == "InvalidRows" and obj["errors"][0]["row"] == 0
    path = tmp_path / "term"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(path))
    write_message("merge", True, "Merged", "done", uri="s3://b/merged/")
    assert json.loads(path.read_text()) == {"stage": "merge", "ok": True, "reason": "Merged", "message": "done",
                                            "uri": "s3://b/merged/"}


def test_token_count_reads_the_total_only_at_logging_steps():
    import torch
    from transformers import TrainerControl, TrainerState

    from kubetune.trainer.callbacks import CountTokens

    count = CountTokens()
    seen = []
    step = count.wrap(lambda model, inputs, *a, **kw: seen.append(inputs) or "loss")
    # padding-free row: every position is a token; padded rows: the mask says which are
    assert step(None, {"input_ids": torch.zeros(1, 300, dtype=torch.long)}) == "loss"
    step(None, {"input_ids": torch.zeros(2, 8, dtype=torch.long),
                "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])})
    assert len(seen) == 2
    assert torch.is_tensor(count.pending)  # the masked sum stays a tensor: nothing waited for it

    state, control = TrainerState(global_step=1, max_steps=10), TrainerControl()
    count.on_step_end(None, state, control)  # a step that neither logs nor saves: no read
    assert state.num_input_tokens_seen == 0 and int(count.pending) == 313
    control.should_log = True
    count.on_step_end(None, state, control)
    assert state.num_input_tokens_seen == 313 and count.pending == 0
    step(None, {"input_ids": torch.zeros(1, 7, dtype=torch.long)})
    state.global_step, control.should_log = 10, False  # the last step always reads
    count.on_step_end(None, state, control)
    assert state.num_input_tokens_seen == 320
