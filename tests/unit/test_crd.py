"""The CRD in crds/ is generated from the API model and must not drift."""

import yaml

from kubetune.operator.crdgen import CRD_PATH, build_crd, render_crd


def _schema():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_matches_the_model():
    assert CRD_PATH.read_text() == render_crd(), "crds/finetunejob.yaml is stale: run `kubetune crd -o crds/finetunejob.yaml`"


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_is_structural():
    for path, node in _walk(_schema()):
        if isinstance(node, dict):
            assert "$ref" not in node, path
            assert "anyOf" not in node, path
            assert "title" not in node, path
            assert node.get("additionalProperties") is not False, path
            assert node.get("default", 0) is not None, path
            if "properties" in node:
                assert node.get("type") == "object", path


def test_every_spec_field_is_described():
    spec = _schema()["properties"]["spec"]
    for path, node in _walk(spec):
        if path.endswith(".properties") and isinstance(node, dict):
            for name, prop in node.items():
                assert prop.get("description"), f"{path}.{name} has no description (kubectl explain)"


def test_names_subresource_and_printer_columns():
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols["Phase"] == ".status.phase"
    assert cols["Progress"] == ".status.progress.percent"
    assert cols["Loss"] == ".status.progress.loss"
    assert cols["Age"] == ".metadata.creationTimestamp"


def test_defaults_and_bounds_reach_the_api_server():
    spec = _schema()["properties"]["spec"]["properties"]
    resources = spec["resources"]["properties"]
    assert spec["resources"]["default"] == {}
    assert resources["gpusPerNode"]["minimum"] == 1 and resources["gpusPerNode"]["maximum"] == 8
    assert resources["strategy"]["enum"] == ["ddp", "deepspeed-zero2", "deepspeed-zero3"]
    lr = spec["training"]["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert spec["training"]["properties"]["batchSize"]["x-kubernetes-int-or-string"] is True


def test_cel_rules_present_with_messages_and_field_paths():
    spec = _schema()["properties"]["spec"]
    rules = spec["x-kubernetes-validations"]
    # No transition rules: every section may be edited (recipe edits are new revisions).
    assert not [r for r in rules if "oldSelf" in r["rule"]]
    assert all(r["message"] and r.get("fieldPath") for r in rules)
    # The recipe's cross-section rules and the stages' admission rules are all there.
    paths = {r["fieldPath"] for r in rules}
    assert {".method.quantization.bits", ".training.performance.fp8", ".serving.mode"} <= paths
    storage_rules = spec["properties"]["storage"]["x-kubernetes-validations"]
    assert storage_rules[0]["fieldPath"] == ".serviceAccountName"
    output_uri = spec["properties"]["output"]["properties"]["uri"]
    assert "s3://" in output_uri["x-kubernetes-validations"][0]["rule"]


def test_status_keeps_kopf_and_stage_results():
    status = _schema()["properties"]["status"]["properties"]
    assert status["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    assert status["evaluation"]["x-kubernetes-preserve-unknown-fields"] is True
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["phase"]["enum"][0] == "Pending"
    for field in ("step", "totalSteps", "loss", "evalLoss", "tokensPerSecond", "etaSeconds", "lastCheckpoint", "updatedAt"):
        assert field in status["progress"]["properties"], field


def test_generated_file_parses_as_one_document():
    docs = list(yaml.safe_load_all(CRD_PATH.read_text()))
    assert len(docs) == 1 and docs[0]["kind"] == "CustomResourceDefinition"


def test_maps_keep_their_value_schema_so_the_api_server_does_not_prune_them():
    pod_meta = _schema()["properties"]["spec"]["properties"]["podMetadata"]["properties"]["train"]["properties"]
    assert pod_meta["annotations"]["additionalProperties"] == {"maxLength": 8192, "type": "string"}
    assert pod_meta["labels"]["additionalProperties"]["type"] == "string"


def test_only_spec_sections_default_to_empty_objects():
    for path, node in _walk(_schema()["properties"]["status"]):
        assert not (isinstance(node, dict) and node.get("type") == "object" and "default" in node), path
