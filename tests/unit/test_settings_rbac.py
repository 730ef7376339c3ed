"""Operator settings from the environment; the operator's RBAC rules."""

import pytest

from kubetune.operator import rbac
from kubetune.operator.settings import OperatorSettings


def test_settings_from_env_with_types():
    s = OperatorSettings.from_env({"KUBETUNE_RECONCILE_INTERVAL": "0.5", "KUBETUNE_STAGE_BACKOFF_LIMIT": "2",
                                   "KUBETUNE_VLLM_IMAGE": "vllm:x", "KUBETUNE_CRASH_AFTER": ""})
    assert s.reconcile_interval == 0.5 and s.stage_backoff_limit == 2 and s.vllm_image == "vllm:x"
    assert s.crash_after == ""


def test_bad_setting_names_the_variable():
    with pytest.raises(ValueError, match="KUBETUNE_STAGE_BACKOFF_LIMIT"):
        OperatorSettings.from_env({"KUBETUNE_STAGE_BACKOFF_LIMIT": "many"})


def test_operator_never_reads_secrets_and_deletes_only_its_children_kinds():
    from kubetune.operator.children import KINDS

    child_resources = {k.plural for k in KINDS}
    for rule in rbac.RULES:
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if "delete" in rule["verbs"]:  # a superseded revision's Jobs, ConfigMaps and Services
            assert set(rule["resources"]) <= child_resources, rule


def test_children_rules_come_from_the_children_table():
    from kubetune.operator.children import KINDS

    for k in KINDS:
        rule = next(r for r in rbac.RULES if r["apiGroups"] == [k.group] and k.plural in r["resources"])
        assert rule["verbs"] == k.verbs()
        # Applied kinds are patched (server-side apply); created-once kinds never are.
        assert ("patch" in rule["verbs"]) is k.applied


def test_operator_can_grant_what_the_per_job_role_grants():
    # RBAC escalation check: one may only grant permissions one holds.
    from kubetune.operator.job_rbac import trainer_role_rules

    for wanted in trainer_role_rules("x"):
        assert any(
            set(wanted["apiGroups"]) <= set(r["apiGroups"]) and set(wanted["resources"]) <= set(r["resources"])
            and set(wanted["verbs"]) <= set(r["verbs"])
            for r in rbac.RULES
        ), wanted
