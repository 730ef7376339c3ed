"""Train a tiny model for real against the S3 server, then merge and evaluate what it produced."""

from __future__ import annotations

import json
import uuid

import pytest

from kubetune.trainer import artifacts

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def trained(s3, tiny_model, support_rows, tmp_path_factory):
    """One training run shared by the tests of this module: (config, TrainResult, base eval loss, store)."""
    from kubetune.devcluster.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY
    from kubetune.trainer.config import parse_config
    from kubetune.trainer.dataset import prepare
    from kubetune.trainer.evaluate import heldout_loss
    from kubetune.trainer.modelio import load_tokenizer, output_store
    from kubetune.trainer.train import run_train

    tmp = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                     "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": REGION, "HF_HUB_OFFLINE": "1",
                     "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log")}.items():
            mp.setenv(k, v)
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        s3.client.create_bucket(Bucket=bucket)
        for f in tiny_model.iterdir():
            s3.client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in support_rows[:160]))
        s3.client.upload_file(str(data), bucket, "data/train.jsonl")
        cfg = parse_config({
            "baseModel": {"uri": f"s3://{bucket}/models/tiny/", "name": "tiny-llama"},
            "dataset": {"uri": f"s3://{bucket}/data/train.jsonl", "validationSplit": 0.15, "maxLength": 160},
            "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
            "training": {"maxSteps": 40, "learningRate": 0.02, "batchSize": 8, "checkpointEvery": 10,
                         "warmupRatio": 0.05, "seed": 3, "keepCheckpoints": 2},
            "output": {"uri": f"s3://{bucket}/artifacts/job/"},
            "merge": {"maxShardSize": "100KB"},
            "evaluation": {"prompts": ["What is the storage limit of Pro?"], "maxNewTokens": 12, "minImprovement": 0.2},
            "storage": {"cacheDir": str(tmp / "cache")},
        })
        tokenizer = load_tokenizer(tiny_model)
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
        base_loss = heldout_loss(base, prepare(cfg, tokenizer, data).validation)
        result = run_train(cfg)
        yield cfg, result, base_loss, output_store(cfg), tmp


def test_training_lowers_eval_loss(trained):
    cfg, result, base_loss, store, _ = trained
    assert result.exit_code == 0 and result.global_step == 40
    # Random weights start near ln(vocab) or above; 40 LoRA steps on a learnable dataset must cut the
    # held-out loss by more than a third (measured: about a half).
    assert result.eval_loss < 0.66 * base_loss, (base_loss, result.eval_loss)


def test_adapter_artifacts_are_complete(trained, tmp_path):
    cfg, result, _, store, _ = trained
    manifest = artifacts.fetch_dir(store, artifacts.ADAPTER, tmp_path)
    names = set(manifest["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-llama" and adapter_config["peft_type"] == "LORA"
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 41))
    assert all(r["totalSteps"] == 40 and "learningRate" in r and "epoch" in r for r in records if "loss" in r)
    assert any("tokensPerSecond" in r and "etaSeconds" in r for r in records)
    assert [r["step"] for r in records if "evalLoss" in r][:4] == [10, 20, 30, 40]
    # Older checkpoints are pruned down to keepCheckpoints, newest kept.
    assert artifacts.complete_checkpoints(store) == [30, 40]


def test_merged_model_equals_base_plus_adapter(trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.merge import run_merge
    from kubetune.trainer.modelio import base_model_dir

    cfg, _, _, store, _ = trained
    assert run_merge(cfg) == 0
    merged_dir = tmp_path / "merged"
    manifest = artifacts.fetch_dir(store, artifacts.MERGED, merged_dir)
    shards = [n for n in manifest["files"] if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in manifest["files"]  # sharded
    assert "tokenizer.json" in manifest["files"]
    adapter_dir = tmp_path / "adapter"
    artifacts.fetch_dir(store, artifacts.ADAPTER, adapter_dir)

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert merged.dtype == torch.bfloat16
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_model_dir(cfg)), dtype=torch.bfloat16),
                                    str(adapter_dir)).eval()
    base_only = AutoModelForCausalLM.from_pretrained(str(base_model_dir(cfg)), dtype=torch.bfloat16).eval()
    ids = torch.randint(5, merged.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, base = (m.eval()(input_ids=ids).logits.float() for m in (merged, ref, base_only))
    scale = want.abs().max().item()
    # Equal within bf16 rounding of the merged weights...
    assert (got - want).abs().max().item() < 0.05 * scale
    # ...and the adapter really changed the model (the comparison above is not vacuous).
    assert (want - base).abs().max().item() > 10 * (got - want).abs().max().item()


def test_evaluate_report_and_gate(trained, monkeypatch):
    from kubetune.trainer.evaluate import gate, run_evaluate

    cfg, result, base_loss, store, tmp = trained
    code, report = run_evaluate(cfg)
    assert code == 0
    assert report["base"]["loss"] == pytest.approx(base_loss, rel=1e-4)
    assert report["tuned"]["loss"] == pytest.approx(result.eval_loss, rel=0.05)
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert report["passed"] is True and report["improvement"] > 0.2
    assert len(report["generations"]) == 1 and report["generations"][0]["prompt"] == cfg.evaluation.prompts[0]
    assert artifacts.read_json(store, artifacts.EVALUATION) == json.loads(json.dumps(report))
    msg = json.loads((tmp / "termination-log").read_text())
    assert msg["stage"] == "evaluate" and msg["ok"] is True and msg["improvement"] == report["improvement"]

    failing = gate(report["base"]["loss"], report["tuned"]["loss"], 0.99)
    assert failing["passed"] is False and failing["improvement"] == report["improvement"]
    assert gate(2.0, 1.0, None) == {"improvement": 0.5, "minImprovement": None, "passed": True}


def test_qlora_on_cpu_is_rejected_clearly(trained):
    from kubetune.trainer.train import TrainingError, run_train

    cfg, *_ = trained
    qlora = cfg.model_copy(deep=True)
    qlora.method.type = "qlora"
    with pytest.raises(TrainingError, match="method.type=qlora needs a CUDA GPU.*method.type=lora"):
        run_train(qlora)
