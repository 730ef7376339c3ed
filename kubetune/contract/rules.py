"""Invariants of the API, each stated once: as a CEL rule for the API server and
as the same check in Python for local runs (`kubetune run`) and unit tests.

A `Rule` becomes an `x-kubernetes-validations` entry of the schema node of the
model that declares it (see `ApiModel`), so the API server rejects a bad
object with the rule's message and `fieldPath`. Transition rules (using
`oldSelf`) have no Python twin: they only make sense on an update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    cel: str
    message: str
    # JSONPath-like path relative to the node, e.g. ".serviceAccountName"; the API
    # server reports the error under this field.
    field_path: Optional[str] = None
    # Python twin: returns True when the model instance is valid.
    check: Optional[Callable[[Any], bool]] = None
    reason: Optional[str] = None  # FieldValueInvalid (default) | FieldValueForbidden | FieldValueRequired

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _add_rules(schema: dict[str, Any], cls: type) -> None:
    rules = getattr(cls, "__rules__", ())
    if rules:
        schema.setdefault("x-kubernetes-validations", []).extend(r.to_schema() for r in rules)


class ApiModel(BaseModel):
    """Base of every API model: camelCase names, unknown keys rejected, CEL rules."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        # A config edited in code (a local run's cache dir, a test's override) is checked too.
        validate_assignment=True,
        json_schema_extra=_add_rules,
    )

    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> "ApiModel":
        for rule in type(self).__rules__:
            if rule.check is not None and not rule.check(self):
                field = (rule.field_path or "").lstrip(".")
                raise ValueError(f"{field}: {rule.message}" if field else rule.message)
        return self


def string_rule(pattern: str, message: str) -> dict[str, Any]:
    """json_schema_extra for one string field: the regex as CEL with a message
    (friendlier than the API server's "should match '^...'")."""
    return {"x-kubernetes-validations": [{"rule": f"self.matches('{pattern}')", "message": message}]}


def matches(pattern: str, value: str) -> bool:
    # CEL's matches() is an unanchored RE2 search; re.search matches that.
    return re.search(pattern, value) is not None
