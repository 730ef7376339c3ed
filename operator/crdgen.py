"""Generate the FineTuneJob CustomResourceDefinition from the pydantic API.

`python -m kubetune.operator.crdgen [-o crds/finetunejob.yaml]` or
`kubetune crd`. Pure except for `main`: `build_crd()` returns the manifest.

pydantic emits JSON Schema; a CRD wants a *structural* OpenAPI v3 schema, so:
`$ref`s are inlined, `Optional[X]` (anyOf X|null) becomes X (optional fields
are simply not required), JSON-Schema-2020 numeric exclusive bounds become
OpenAPI 3.0 booleans, `const` becomes a one-value enum, and `title` and
`additionalProperties: false` go (the API server prunes unknown fields).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from .api import FineTuneJobSpec, FineTuneJobStatus
from kubetune.contract.facts import CATEGORIES, GROUP, KIND, LIST_KIND, MAX_NAME_LENGTH, PLURAL, SHORT_NAMES, SINGULAR, VERSION

CRD_PATH = Path(__file__).resolve().parent.parent / "crds" / "finetunejob.yaml"

_DROP = {"title", "$defs"}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Training progress in percent."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
    {"name": "Serving", "type": "string", "jsonPath": ".status.servingRevision",
     "description": "The revision taking the traffic (an edit's new one trains and is evaluated beside it)."},
    {"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason",
     "description": "Why the job is or is not Ready."},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint.url", "priority": 1, "description": "Serving URL."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: Any, defs: dict[str, Any], defaulted: frozenset[str] = frozenset()) -> Any:
    """`defaulted`: names of object properties that default to {} (spec sections)."""
    if isinstance(node, list):
        return [_resolve(n, defs, defaulted) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        # The field's own description/default win over the class docstring.
        target.update(node)
        node = target
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            # An int-or-string's constraints are CEL rules on the parent model.
            node.pop("anyOf")
        elif len(branches) == 1:
            node.pop("anyOf")
            branch = _resolve(branches[0], defs, defaulted)
            merged = {**branch, **{k: v for k, v in node.items() if k != "default" or v is not None}}
            if "x-kubernetes-validations" in branch and "x-kubernetes-validations" in node:
                merged["x-kubernetes-validations"] = branch["x-kubernetes-validations"] + node["x-kubernetes-validations"]
            node = merged
        else:
            raise ValueError(f"union without a structural equivalent: {node}")
    if node.get("default", 0) is None:
        node.pop("default")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs, defaulted) for name, prop in value.items()}
        elif key == "items":
            out[key] = _resolve(value, defs, defaulted)
        elif key == "additionalProperties":
            # A map's value schema stays; `false` (extra="forbid") is implied by
            # pruning and not allowed in a structural schema; `true` is said by
            # x-kubernetes-preserve-unknown-fields instead.
            if isinstance(value, dict):
                out[key] = _resolve(value, defs, defaulted)
        else:
            out[key] = value
    if "properties" in out:
        out.setdefault("type", "object")
        # Sections with a default_factory and no required fields default to {}
        # so that the API server fills in their nested defaults.
        required = set(out.get("required", []))
        for name, prop in out["properties"].items():
            if name not in required and prop.get("type") == "object" and "default" not in prop and not prop.get("required"):
                if name in defaulted:
                    prop["default"] = {}
    return out


# The spec sections built with default_factory (present even when omitted).
SPEC_DEFAULTED_SECTIONS = frozenset(
    {"method", "training", "performance", "resources", "evaluation", "serving", "storage", "quantization", "podMetadata"}
)


def schema_of(model: type, defaulted: frozenset[str] = frozenset()) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    return _resolve(raw, raw.get("$defs", {}), defaulted)


def _crd(*, kind: str, list_kind: str, plural: str, singular: str, short_names: list[str], scope: str,
         printer_columns: list[dict[str, Any]], description: str, spec: dict[str, Any],
         status: Optional[dict[str, Any]] = None, rules: Optional[list[dict[str, str]]] = None) -> dict[str, Any]:
    """One CustomResourceDefinition of the kubetune.io group, version VERSION: `spec` required, `status`
    (a subresource) when given, `rules` CEL on the whole object."""
    properties: dict[str, Any] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                  "metadata": {"type": "object"}, "spec": spec}
    if status is not None:
        properties["status"] = status
    root: dict[str, Any] = {"type": "object", "description": description, "required": ["spec"],
                            "properties": properties}
    if rules:
        root["x-kubernetes-validations"] = rules
    version: dict[str, Any] = {"name": VERSION, "served": True, "storage": True}
    if status is not None:
        version["subresources"] = {"status": {}}
    version["additionalPrinterColumns"] = printer_columns
    version["schema"] = {"openAPIV3Schema": root}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/name": "kubetune"}},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {"kind": kind, "listKind": list_kind, "plural": plural, "singular": singular,
                      "shortNames": list(short_names), "categories": list(CATEGORIES)},
            "versions": [version],
        },
    }


def build_crd() -> dict[str, Any]:
    from . import stages

    spec_schema = schema_of(FineTuneJobSpec, SPEC_DEFAULTED_SECTIONS)
    # What no stage can do is refused at admission (each stage's own rules).
    spec_schema.setdefault("x-kubernetes-validations", []).extend(r.to_schema() for r in stages.admission_rules())
    status_schema = schema_of(FineTuneJobStatus)
    status_schema.pop("required", None)
    status_schema["properties"]["phase"]["enum"] = stages.phases()
    conditions = status_schema["properties"]["conditions"]
    conditions["description"] = f"One per stage: {', '.join(stages.condition_types())}."
    conditions["items"]["properties"]["type"]["description"] = " | ".join(stages.condition_types())
    rules = [
        {
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
            "(child objects and pod hostnames append suffixes)",
        },
        {
            "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            "message": "metadata.name must be a DNS-1035 label (it names Services): "
            "lowercase letters, digits and '-', starting with a letter",
        },
    ]
    return _crd(kind=KIND, list_kind=LIST_KIND, plural=PLURAL, singular=SINGULAR, short_names=SHORT_NAMES,
                scope="Namespaced", printer_columns=PRINTER_COLUMNS,
                description="FineTuneJob: one fine-tuning run, from data validation to a served model.",
                spec=spec_schema, status=status_schema, rules=rules)


HEADER = "# GENERATED by `kubetune crd` from kubetune.operator.api; do not edit.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


TENANT_POLICY_CRD_PATH = CRD_PATH.with_name("tenantpolicy.yaml")


def build_tenant_policy_crd() -> dict[str, Any]:
    """The cluster-scoped TenantPolicy CRD (operator/api/tenancy.py): the tenancy admission policy's parameters."""
    from .api import tenancy

    return _crd(kind=tenancy.KIND, list_kind=tenancy.LIST_KIND, plural=tenancy.PLURAL, singular=tenancy.SINGULAR,
                short_names=tenancy.SHORT_NAMES, scope="Cluster", printer_columns=tenancy.PRINTER_COLUMNS,
                description="TenantPolicy: limits on the FineTuneJobs of the namespaces it selects, enforced by the "
                "API server (ValidatingAdmissionPolicy kubetune-tenancy) and by the operator.",
                spec=schema_of(tenancy.TenantPolicySpec))


def render_tenant_policy_crd() -> str:
    return HEADER + yaml.safe_dump(build_tenant_policy_crd(), sort_keys=False, width=120)


ADAPTER_SERVER_CRD_PATH = CRD_PATH.with_name("adapterserver.yaml")


def build_adapter_server_crd() -> dict[str, Any]:
    """The AdapterServer CRD (operator/api/adapterserver.py): adapter mode's shared vLLM server."""
    from .api import adapterserver as api

    status = schema_of(api.AdapterServerStatus)
    status.pop("required", None)
    return _crd(kind=api.KIND, list_kind=api.LIST_KIND, plural=api.PLURAL, singular=api.SINGULAR,
                short_names=api.SHORT_NAMES, scope="Namespaced", printer_columns=api.PRINTER_COLUMNS,
                description="AdapterServer: one vLLM server of a base model carrying the adapters of the "
                "FineTuneJobs that own it (serving.mode adapter). Created and deleted by the operator.",
                spec=schema_of(api.AdapterServerSpec, frozenset({"serving", "storage"})), status=status)


def render_adapter_server_crd() -> str:
    return HEADER + yaml.safe_dump(build_adapter_server_crd(), sort_keys=False, width=120)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the FineTuneJob CRD generated from the API model.")
    parser.add_argument("-o", "--output", default=str(CRD_PATH), help="file to write, '-' for stdout")
    args = parser.parse_args(argv)
    text = render_crd()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
