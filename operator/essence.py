"""kopf's diff-base ("essence") storage, built without copying what it drops.

For every watch event of every watched resource, kopf builds the object's
essence (what its change detection compares) with `copy.deepcopy` of the
whole body, then deletes `status` and most of `metadata`. For the Pods and
Jobs the operator watches, most of a body is exactly what is deleted (status,
`metadata.managedFields`): profiled under the latency benchmark (50
FineTuneJobs, bench/operator_latency.py), that deepcopy was the largest cost
of the operator's event loop, more than the reconciles themselves. Here the
body handed to kopf's own `build` leaves those parts out, so the essence is
the same (a unit test compares the two) at a fraction of the copying.

The progress storage then deep-copies that essence once more to strip its own
annotations from it; when it carries none (every child, and a FineTuneJob
between handler runs) the copy would be identical, so it is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import kopf


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    def build(self, *, body: kopf.Body, extra_fields: Optional[Iterable[Any]] = None) -> kopf.BodyEssence:
        extra = list(extra_fields or [])
        if not extra:  # extra fields may name status or metadata fields: then the whole body
            lean: dict[str, Any] = {k: v for k, v in body.items() if k != "status"}
            meta = body.get("metadata")
            if isinstance(meta, Mapping):
                lean["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
            body = kopf.Body(lean)
        return super().build(body=body, extra_fields=extra)


class LeanProgressStorage(kopf.AnnotationsProgressStorage):
    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        if self.prefix and not any(key.startswith(f"{self.prefix}/") for key in annotations):
            # Nothing of ours to strip: the essence is a fresh copy already (build), and
            # kopf only reads it (diffs) or serialises it (the diff-base annotation).
            return essence
        return super().clear(essence=essence)
