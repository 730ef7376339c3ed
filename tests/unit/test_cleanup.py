"""deleteOnJobDeletion: the cleanup Job, and the deletion it runs (against the
loopback S3 server)."""

import pytest
import yaml

from kubetune.operator import artifact_cleanup, stage_jobs
from kubetune.operator.api import FineTuneJob
from kubetune.operator.render import trainer_config_for
from kubetune.operator.settings import OperatorSettings
from kubetune.trainer.storage import LocalStore

from .jobs import job


def test_cleanup_job_is_not_owned_and_expires():
    obj = stage_jobs.cleanup_job(FineTuneJob.from_body(job(output={"deleteOnJobDeletion": True})), OperatorSettings())
    assert "ownerReferences" not in obj["metadata"]  # must survive the FineTuneJob's garbage collection
    assert obj["metadata"]["name"] == "support-bot-cleanup-11112222"
    assert obj["metadata"]["labels"]["kubetune.io/stage"] == "cleanup"
    assert obj["spec"]["ttlSecondsAfterFinished"] == stage_jobs.CLEANUP_TTL_SECONDS
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    # Every revision goes: the whole output.uri, not the current revision's prefix.
    assert c["command"] == ["kubetune", "delete-artifacts", "--config", "/etc/kubetune/trainer.yaml",
                            "--uri", "s3://artifacts/tenant-a/support-bot/"]


class RecordingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.deleted = []

    def delete(self, key):
        self.deleted.append(key)
        super().delete(key)


def test_manifests_are_deleted_before_the_data(tmp_path):
    store = RecordingStore(tmp_path)
    for key in ("adapter/model.safetensors", "adapter/MANIFEST.json", "merged/a.safetensors", "merged/MANIFEST.json"):
        store.put_bytes(b"x", key)
    assert artifact_cleanup.delete_all(store) == 4
    assert store.deleted[:2] == ["adapter/MANIFEST.json", "merged/MANIFEST.json"]
    assert store.list("") == []


@pytest.fixture
def aws_env(monkeypatch):
    from kubetune.devcluster.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", "/dev/null")


def test_delete_artifacts_empties_the_output_prefix_and_nothing_else(s3, tmp_path, aws_env):
    s3.client.create_bucket(Bucket="cleanup-test")
    for key in ("run/adapter/MANIFEST.json", "run/adapter/w.bin", "run/checkpoints/step-00000010/x", "run-2/keep.bin"):
        s3.client.put_object(Bucket="cleanup-test", Key=key, Body=b"x")
    cfg = trainer_config_for(job(output={"uri": "s3://cleanup-test/run/", "deleteOnJobDeletion": True},
                                 storage={"endpointUrl": s3.endpoint_url}))
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert artifact_cleanup.run(path, "s3://cleanup-test/run/") == 0
    left = [o["Key"] for o in s3.client.list_objects_v2(Bucket="cleanup-test").get("Contents", [])]
    assert left == ["run-2/keep.bin"]
