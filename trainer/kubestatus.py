"""Patching the FineTuneJob's status.progress from the training pod (rank 0 only).

Throttled (one patch every `min_interval` seconds, the latest values win) and
never fatal: an unreachable API server costs a log line, not the training run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

from kubetune.contract.facts import ENV_JOB_NAME as ENV_NAME
from kubetune.contract.facts import ENV_JOB_NAMESPACE as ENV_NAMESPACE
from kubetune.contract.facts import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"

log = logging.getLogger(__name__)


def progress_patch(progress: dict[str, Any]) -> dict[str, Any]:
    """Pure: the merge-patch body for status.progress (None values left out)."""
    return {"status": {"progress": {k: v for k, v in progress.items() if v is not None}}}


def job_from_env(name: Optional[str] = None, namespace: Optional[str] = None) -> Optional[tuple[str, str]]:
    name = os.environ.get(ENV_NAME) or name
    namespace = os.environ.get(ENV_NAMESPACE) or namespace
    return (name, namespace) if name and namespace else None


def _default_api():
    from kubernetes import client, config

    conf = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=conf)
    except config.ConfigException:
        # Read KUBECONFIG now: the client library resolves its default path once, at import.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=conf)
    return client.CustomObjectsApi(client.ApiClient(conf))


class StatusPatcher:
    def __init__(self, name: str, namespace: str, min_interval: float = 5.0,
                 api_factory: Callable[[], Any] = _default_api, clock: Callable[[], float] = time.monotonic):
        self.name, self.namespace = name, namespace
        self.min_interval = min_interval
        self._api_factory = api_factory
        self._api = None
        self._clock = clock
        self._last = float("-inf")
        self._pending: Optional[dict[str, Any]] = None
        self.failures = 0
        self.sent = 0

    def update(self, progress: dict[str, Any], force: bool = False) -> bool:
        """Remember the newest progress; send it if the throttle allows. True when a patch was sent."""
        self._pending = progress
        if not force and self._clock() - self._last < self.min_interval:
            return False
        return self.flush()

    def flush(self) -> bool:
        if self._pending is None:
            return False
        self._last = self._clock()
        body = progress_patch(self._pending)
        try:
            if self._api is None:
                self._api = self._api_factory()
            self._api.patch_namespaced_custom_object_status(
                group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL, name=self.name, body=body,
                _request_timeout=5, _content_type=MERGE_PATCH,
            )
        except Exception as e:  # any API or network failure: training goes on
            self.failures += 1
            if self.failures <= 3 or self.failures % 50 == 0:
                log.warning("could not patch %s/%s status (%d failures): %s", self.namespace, self.name, self.failures, e)
            return False
        self._pending = None
        self.sent += 1
        return True
