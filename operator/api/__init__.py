"""The FineTuneJob API (pydantic): the single source of truth for the CRD."""

from typing import Any, Optional

from pydantic import Field

from kubetune.contract.facts import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, VERSION
from kubetune.contract.rules import ApiModel, Rule
from .spec import FineTuneJobSpec
from .status import TERMINAL_PHASES, Condition, FineTuneJobStatus


class ObjectMeta(ApiModel):
    name: str = Field(min_length=1, max_length=253)
    namespace: Optional[str] = None
    generation: Optional[int] = None
    uid: Optional[str] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    model_config = ApiModel.model_config | {"extra": "ignore"}


class FineTuneJob(ApiModel):
    """A whole FineTuneJob object (as read from YAML or the API server)."""

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)

    model_config = ApiModel.model_config | {"extra": "ignore"}

    @classmethod
    def from_body(cls, body: Any) -> "FineTuneJob":
        """From a kopf body / API dict / YAML document."""
        return cls.model_validate(dict(body))


__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "SHORT_NAMES", "VERSION",
    "ApiModel", "Rule", "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "Condition",
    "TERMINAL_PHASES", "ObjectMeta",
]
