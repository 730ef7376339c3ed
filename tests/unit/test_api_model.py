"""The FineTuneJob pydantic model: defaults, bounds and cross-field rules."""

import pytest
from pydantic import ValidationError

from kubetune.operator.api import FineTuneJob

from .jobs import job


def test_minimal_job_gets_defaults():
    ftj = FineTuneJob.from_body(job())
    assert ftj.spec.method.type == "qlora"
    assert ftj.spec.resources.nodes == 1 and ftj.spec.resources.gpus_per_node == 1
    assert ftj.spec.training.batch_size == "auto"
    assert ftj.spec.output.merge is True
    assert ftj.spec.serving.mode == "merged"


@pytest.mark.parametrize(
    "overrides, field, text",
    [
        ({"baseModel": {"uri": "gs://models/x/"}}, "spec.baseModel.uri", "s3:// URI of a model directory"),
        ({"dataset": {"uri": "https://example.org/x.jsonl"}}, "spec.dataset.uri", "s3://"),
        ({"output": {"uri": "/tmp/out"}}, "spec.output.uri", "s3://"),
        ({"resources": {"gpusPerNode": 9}}, "spec.resources.gpusPerNode", "less than or equal to 8"),
        ({"resources": {"gpusPerNode": 0}}, "spec.resources.gpusPerNode", "greater than or equal to 1"),
        ({"method": {"type": "full"}}, "spec.method.type", "'lora' or 'qlora'"),
        ({"training": {"batchSize": 0}}, "spec.training", "batchSize"),
        ({"storage": {"credentialsSecretRef": {"name": "s3"}, "serviceAccountName": "irsa"}}, "spec.storage", "not both"),
        ({"method": {"type": "qlora", "quantization": {"bits": 8}}, "resources": {"strategy": "deepspeed-zero3"}}, "spec",
         "8-bit qlora"),
        ({"output": {"merge": False}}, "spec", "serving.mode merged needs output.merge"),
        ({"training": {"performance": {"fp8": "on"}}, "resources": {"strategy": "deepspeed-zero3"}}, "spec",
         "training.performance.fp8: on cannot be combined with strategy deepspeed-zero3"),
        ({"training": {"performance": {"fp8": "fp4"}}}, "spec.training.performance.fp8", "'auto', 'on' or 'off'"),
        ({"training": {"fp8": "on"}}, "spec.training.fp8", "Extra inputs are not permitted"),
        ({"training": {"optimizer": "lion"}}, "spec.training.optimizer", "paged_adamw_8bit"),
        ({"method": {"bias": "some"}}, "spec.method.bias", "'none', 'all' or 'lora_only'"),
        ({"method": {"useDora": True}, "training": {"performance": {"fusedLora": "on"}}}, "spec", "method.useDora"),
        ({"training": {"performance": {"memoryBudgetGiB": 0}}}, "spec.training.performance.memoryBudgetGiB", "greater than 0"),
        ({"evaluation": {"enabled": False, "minImprovement": 0.1}}, "spec", "evaluation.minImprovement needs"),
        ({"resources": {"queueName": "Team_A"}}, "spec.resources.queueName", "DNS label"),
    ],
)
def test_bad_spec_is_rejected_naming_the_field(overrides, field, text):
    with pytest.raises(ValidationError) as err:
        FineTuneJob.from_body(job(**overrides))
    rendered = str(err.value)
    assert field in rendered
    assert text in rendered


def test_hugging_face_ids_and_revisions_are_refused_saying_how_to_use_s3():
    # kubetune never downloads from a hub: the message says how to copy the snapshot to S3 once.
    with pytest.raises(ValidationError, match="huggingface-cli download"):
        FineTuneJob.from_body(job(baseModel={"uri": "meta-llama/Llama-3.1-8B"}))
    with pytest.raises(ValidationError, match="remove revision"):
        FineTuneJob.from_body(job(baseModel={"uri": "s3://models/llama/", "revision": "main"}))


def test_4bit_qlora_with_zero3_is_accepted():
    ftj = FineTuneJob.from_body(job(method={"type": "qlora"}, resources={"strategy": "deepspeed-zero3"}))
    assert ftj.spec.method.quantization.bits == 4 and ftj.spec.resources.strategy == "deepspeed-zero3"
