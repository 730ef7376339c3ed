"""FineTuneJob -> TrainerConfig: every spec field reaches the trainer or is declared
operator-only, and the API's and the trainer's defaults are the same objects."""

from __future__ import annotations

import typing
from typing import Any, Literal, Optional, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from kubetune.contract import recipe
from kubetune.operator import render
from kubetune.operator.api import FineTuneJob, FineTuneJobSpec
from kubetune.operator.revisions import revision_id
from kubetune.operator.render import OPERATOR_ONLY, RECIPE_SECTIONS, RENDERED, trainer_config_for
from kubetune.trainer.config import TrainerConfig, load_config

from .jobs import job


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model inside Optional[...] / Annotated[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and get_origin(field.annotation) not in (list, dict):
            out += leaf_paths(sub, prefix + (name,))
        else:
            out.append(prefix + (name,))
    return out


def _declared(path: tuple[str, ...]) -> str:
    if path[0] in RECIPE_SECTIONS:
        return "recipe"
    if path in RENDERED:
        return "rendered"
    if any(path[: len(p)] == p for p in OPERATOR_ONLY):
        return "operator-only"
    return ""


def test_every_spec_field_reaches_the_trainer_or_is_operator_only():
    undeclared = [".".join(p) for p in leaf_paths(FineTuneJobSpec) if not _declared(p)]
    assert undeclared == [], f"spec fields neither rendered nor declared operator-only: {undeclared}"
    # And nothing is declared twice or declared for a field that does not exist.
    paths = set(leaf_paths(FineTuneJobSpec))
    for declared in list(RENDERED) + list(OPERATOR_ONLY):
        assert any(p[: len(declared)] == declared for p in paths), declared
        assert declared[0] not in RECIPE_SECTIONS
    assert not set(RENDERED) & set(OPERATOR_ONLY)


def test_recipe_sections_are_the_same_classes_on_both_sides():
    for name in RECIPE_SECTIONS:
        api = _model_of(FineTuneJobSpec.model_fields[name].annotation)
        trainer = _model_of(TrainerConfig.model_fields[name].annotation)
        # The API may only narrow (s3:// URIs): it subclasses the trainer's class.
        assert issubclass(api, trainer), name
        assert trainer.__module__ == recipe.__name__, name
        for field, info in trainer.model_fields.items():
            api_info = api.model_fields[field]
            assert api_info.get_default(call_default_factory=True) == info.get_default(call_default_factory=True), (
                f"{name}.{field}: the API's default differs from the trainer's")


def test_defaults_the_trainer_sees_are_the_apis():
    cfg = trainer_config_for(job())
    assert cfg.method.type == recipe.MethodSpec().type == "qlora"
    assert cfg.training.gradient_checkpointing is recipe.TrainingSpec().gradient_checkpointing is True
    assert cfg.training.performance == recipe.PerformanceSpec()
    assert cfg.evaluation.max_eval_rows == recipe.EvaluationSpec().max_eval_rows


def _other_value(annotation: Any, current: Any, field: Any) -> Any:
    """A valid value different from `current` for a leaf field, chosen from its type."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return next(v for v in get_args(annotation) if v != current)
    if get_origin(annotation) in (Union, typing.Union) or (args and get_origin(annotation) is not list):
        literal = [a for a in args if get_origin(a) is Literal]
        others = [v for lit in literal for v in get_args(lit) if v != current]
        if others:
            return others[0]
        plain = [a for a in args if get_origin(a) is not Literal]
        return _other_value(plain[0], current if type(current) is plain[0] else None, field)
    if annotation is bool:
        return not current
    bounds = {type(m).__name__: m for m in field.metadata}
    if annotation is int:
        value = (current or 0) + 1
        return min(value, bounds["Le"].le) if "Le" in bounds else value
    if annotation is float:
        upper = bounds["Lt"].lt if "Lt" in bounds else bounds["Le"].le if "Le" in bounds else None
        value = (current or 0) + 0.01 if current is not None else 0.01
        return min(value, upper * 0.9) if upper is not None else value
    if get_origin(annotation) is list:
        return ["q_proj"]
    if annotation is str:
        return "x" if current != "x" else "y"
    raise AssertionError(f"no other value for {annotation}")


# URIs have their own patterns on each side; baseModel.revision is refused by the API (no hub downloads).
RECIPE_LEAVES = [p for p in leaf_paths(FineTuneJobSpec)
                 if p[0] in RECIPE_SECTIONS and p[-1] != "uri" and p != ("base_model", "revision")]


@pytest.mark.parametrize("path", RECIPE_LEAVES, ids=[".".join(p) for p in RECIPE_LEAVES])
def test_a_changed_recipe_field_changes_the_trainer_config_at_the_same_path(path):
    base = FineTuneJob.from_body(job(serving={"enabled": False}))
    section = base.spec
    for part in path[:-1]:
        section = getattr(section, part)
    field = type(section).model_fields[path[-1]]
    new = _other_value(field.annotation, getattr(section, path[-1]), field)
    setattr(section, path[-1], new)  # validate_assignment: a value the API accepts
    cfg = trainer_config_for(base)
    value: Any = cfg
    for part in path:
        value = getattr(value, part)
    assert value == new


CAMEL = {"endpoint_url": "endpointUrl", "kernel_cache_uri": "kernelCacheUri"}


@pytest.mark.parametrize("src,dst", list(RENDERED.items()), ids=[".".join(s) for s in RENDERED])
def test_rendered_fields_land_where_declared(src, dst):
    values = {
        ("output", "uri"): "s3://elsewhere/run/",
        ("output", "merge"): False,
        ("output", "kernel_cache_uri"): "s3://team/kernel-cache/",
        ("resources", "strategy"): "deepspeed-zero2",
        ("storage", "endpoint_url"): "http://minio:9000",
        ("storage", "region"): "eu-west-1",
        ("serving", "gpus"): 4,
    }
    body = job(serving={"enabled": src[0] == "serving"})
    node = body["spec"]
    for part in src[:-1]:
        node = node.setdefault(CAMEL.get(part, part), {})
    node[CAMEL.get(src[-1], src[-1])] = values[src]
    cfg = trainer_config_for(body)
    expected = values[src]
    if src == ("output", "uri"):  # each revision writes under its own prefix of output.uri
        expected = f"{expected}revisions/{revision_id(FineTuneJob.from_body(body).spec)}/"
    assert getattr(getattr(cfg, dst[0]), dst[1]) == expected


def test_every_revision_shares_the_jobs_kernel_cache():
    first = job()
    first["spec"]["output"]["uri"] = "s3://bucket/jobs/a"
    edited = job()
    edited["spec"]["output"]["uri"] = "s3://bucket/jobs/a"
    edited["spec"]["training"] = {**edited["spec"].get("training", {}), "learningRate": 1e-5}
    a, b = trainer_config_for(first), trainer_config_for(edited)
    assert a.output.uri != b.output.uri  # two revisions, two artifact prefixes
    assert a.output.kernel_cache_uri == b.output.kernel_cache_uri == "s3://bucket/jobs/a/kernel-cache/"
    shared = job()
    shared["spec"]["output"]["kernelCacheUri"] = "s3://bucket/team/kernel-cache/"  # a team's jobs share one
    assert trainer_config_for(shared).output.kernel_cache_uri == "s3://bucket/team/kernel-cache/"
    assert revision_id(FineTuneJob.from_body(shared).spec) == revision_id(FineTuneJob.from_body(job()).spec)


def test_nothing_served_means_no_tensor_parallel_check():
    assert trainer_config_for(job(serving={"enabled": False, "gpus": 4})).serve.tensor_parallel_size is None


def test_all_linear_and_namespace_override(tmp_path):
    cfg = trainer_config_for(job(), namespace="other")
    assert cfg.method.peft_target_modules == "all-linear"
    assert cfg.training.performance.fp8 == "auto"  # the default travels too: the trainer decides per GPU
    assert cfg.job.namespace == "other"
    path = tmp_path / "trainer.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_secrets_never_reach_the_config():
    text = trainer_config_for(job(storage={"credentialsSecretRef": {"name": "s3-creds"}})).to_yaml()
    assert "s3-creds" not in text
    assert render.OPERATOR_ONLY >= {("storage", "credentials_secret_ref")}
