"""FineTuneJob documents shared by the unit tests."""

import copy

MINIMAL_SPEC = {
    "baseModel": {"uri": "s3://models/llama-3-8b/"},
    "dataset": {"uri": "s3://data/support.jsonl"},
    "output": {"uri": "s3://artifacts/tenant-a/support-bot/"},
}


def job(name="support-bot", namespace="tenant-a", generation=1, uid="1111-2222", **spec_overrides):
    spec = copy.deepcopy(MINIMAL_SPEC)
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "generation": generation, "uid": uid},
        "spec": spec,
    }
