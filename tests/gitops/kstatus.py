"""kstatus's verdict on a FineTuneJob, as Flux (kustomize-controller's `wait` and
`healthChecks`) computes it: the generic rules of sigs.k8s.io/cli-utils
pkg/kstatus/status (generic.go `checkGenericProperties`, then `Compute`'s
fallback for kinds without rules of their own), transcribed. A custom resource
has no kind-specific rules, so these are all of them."""

from __future__ import annotations

from typing import Any


def compute(obj: dict[str, Any]) -> str:
    """Current, InProgress, Failed or Terminating."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"  # LatestGenerationNotObserved
    for cond in status.get("conditions") or []:  # the first of the two that is True decides
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return "InProgress"
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return "Failed"
    return "Current"  # no rule applies: "Resource is current"
