"""Who asks for a FineTuneJob's reconcile, and when: one work queue keyed by
the FineTuneJob's (namespace, name).

Reasons to reconcile arrive from several watch streams at once: the
FineTuneJob itself (create, spec edit, a trainer's progress patch), its Jobs,
their Pods, its Deployment; plus a slow resync (the safety net for anything
no watched object announces, and for a missed watch event) and retries after
errors. kopf serialises handlers per *watched object*, so a Pod's handler and
its owner's handler may run at the same moment; calling the reconciler from
each would run two reconciles of one FineTuneJob concurrently. Instead every
handler only calls `trigger(key)`, and the queue guarantees, like
controller-runtime's workqueue:

- at most one reconcile per key runs at a time (one asyncio task per key);
- a trigger while one runs is not lost: the key is marked dirty and runs once
  more right after, reading the FineTuneJob afresh (so a burst of child
  events costs one or two passes, not one each);
- after every pass the key is scheduled again `resync` seconds later (the
  timer of old, now a safety net), or after a backoff when the pass failed.

Why a queue in this process rather than touching an annotation on the owner
so that its own handler runs: that costs a write to the API server per child
event, bumps the owner's resourceVersion (conflicting with the trainer's
status patches) and adds a watch round trip to every hop; the queue costs
nothing and is just as race-free, because every pass starts with a fresh GET
of the owner under the per-key exclusivity.

The reconciler is not always done in one pass: a pass that only records
`Pending` creates the first Job on the next one. So a pass whose status
write moved the phase is followed at once by another (`requeue_on_write`),
up to `max_requeues` in a row, and the FineTuneJob's watch events of our own
writes are dropped (`own_write`). Not followed at once: a write that left the
phase as it was (a stage's "running" message: the next pass would see the
same children and decide the same), and a pass that changed a watched child
(created the next Job, say), whose watch event brings the next pass with the
child in it. Measured under 50 jobs, following every write made about half
of all passes, each a round of API reads that found nothing new. Whatever
this rule misses, the resync catches.

Which child events are reasons at all is `ChildSignals`' business: only
those that can change what a pass decides.

No kopf and no Kubernetes client here (asyncio, and the pure readings of
outcomes.py), so the rules above are tested without a cluster; the handlers
(`handlers.py`) supply `work`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from prometheus_client import Counter, Histogram

from kubetune.contract.facts import LABEL_JOB

from .outcomes import deployment_outcome, job_outcome

log = logging.getLogger("kubetune.operator.triggers")

Key = tuple[str, str]  # (namespace, FineTuneJob name)

TRIGGERS = Counter("kubetune_reconcile_triggers_total", "Requests for a reconcile, by what asked", ["source"])
WAIT = Histogram(
    "kubetune_reconcile_wait_seconds", "From the request that found a FineTuneJob idle to the start of its pass",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


@dataclass(frozen=True)
class Pass:
    """What one reconcile pass did."""

    exists: bool = True  # False: the FineTuneJob is gone; stop scheduling it
    wrote: Optional[str] = None  # resourceVersion of the status this pass wrote, if any
    # The pass created, changed or deleted a watched child: that child's own watch
    # event triggers the next pass, so a status write needs no immediate follow-up.
    announced: bool = False
    # The status it wrote changed the phase (see ReconcileQueue: only then is a
    # write followed by another pass at once).
    transition: bool = False


class RetryLater(Exception):
    """The pass could not finish; try again after `delay` seconds (not counted as a failure of the code)."""

    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


def owner_key(body: Mapping[str, Any]) -> Optional[Key]:
    """The FineTuneJob a child belongs to, from its `kubetune.io/job` label.

    The label, not the ownerReference: Pods of the stage Jobs are owned by the
    Job, not by the FineTuneJob, and every child carries the label."""
    meta = body.get("metadata") or {}
    name = (meta.get("labels") or {}).get(LABEL_JOB)
    namespace = meta.get("namespace")
    return (namespace, name) if name and namespace else None


# ---- which child events can change a reconcile's outcome

# Waiting reasons of a container that is simply starting; any other reason
# (a bad image, a missing Secret, a crash loop, whatever a future Kubernetes
# names) is news the owning Job does not show.
_STARTING = ("ContainerCreating", "PodInitializing")


def _pod_signal(pod: Mapping[str, Any]) -> tuple:
    """What a Pod shows that its Job does not. A pod starting, running and
    succeeding is mirrored by its Job's status (active, conditions), whose
    own events trigger the reconcile; a pod that cannot be scheduled, waits
    on something that will not fix itself, or fails is not (or not yet)."""
    status = pod.get("status") or {}
    phase = status.get("phase")
    waiting = tuple(sorted(
        (cs.get("name", ""), ((cs.get("state") or {}).get("waiting") or {}).get("reason", ""))
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        if ((cs.get("state") or {}).get("waiting") or {}).get("reason") not in (None, *_STARTING)
    ))
    unscheduled = tuple(sorted(
        (c.get("reason", ""), c.get("message", "")) for c in status.get("conditions") or []
        if c.get("type") == "PodScheduled" and c.get("status") == "False"
    ))
    disrupted = tuple(sorted(c.get("reason", "") for c in status.get("conditions") or []
                             if c.get("type") == "DisruptionTarget" and c.get("status") == "True"))
    return (phase if phase in ("Failed", "Unknown") else None, status.get("reason"), waiting, unscheduled, disrupted)


def _outcome_signal(outcome_of: Callable[..., Any]) -> Callable[[Mapping[str, Any]], tuple]:
    """A Job's or Deployment's signal is the stage outcome it gives on its own
    (outcomes.py: the very reading a reconcile makes, pods aside), so a change
    the reconciler would not see (a ready count, the Complete condition after
    SuccessCriteriaMet) triggers nothing, and whatever outcomes.py learns to
    read counts here too."""

    def signal(body: Mapping[str, Any]) -> tuple:
        o = outcome_of(dict(body), [])
        return (o.state, o.reason, o.message, o.generation, json.dumps(o.details, sort_keys=True, default=str))

    return signal


SIGNALS: dict[str, Callable[[Mapping[str, Any]], tuple]] = {
    "pods": _pod_signal,
    "jobs": _outcome_signal(job_outcome),
    "deployments": _outcome_signal(deployment_outcome),
}


class ChildSignals:
    """Per child (by uid), the last signal seen: an event whose signal has not
    changed triggers nothing. Kinds without a signal function always trigger.

    Under 50 FineTuneJobs on the 2-core machine, the Pods' and Jobs' routine
    events (about 40 per FineTuneJob) each started a pass that found nothing
    new; every pass costs API reads, and the API server is what saturates.
    The resync still looks at everything now and then."""

    def __init__(self, signals: Mapping[str, Callable[[Mapping[str, Any]], tuple]] = SIGNALS):
        self._signals = signals
        self._last: dict[str, tuple] = {}

    def changed(self, plural: str, body: Mapping[str, Any], deleted: bool) -> bool:
        """True when this watch event of a child may change its owner's reconcile."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid") or ""
        if deleted:
            self._last.pop(uid, None)
            # A deleted Job or Deployment may need re-creating; a deleted Pod is
            # replaced (or not) by its Job, whose status says so.
            return plural != "pods"
        fn = self._signals.get(plural)
        if fn is None:
            return True
        signal = (bool(meta.get("deletionTimestamp")), fn(body))
        if self._last.get(uid) == signal:
            return False
        first = uid not in self._last
        self._last[uid] = signal
        # A Pod seen for the first time matters only if it already shows something.
        return not (first and plural == "pods" and signal == (False, _pod_signal({})))


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


class ReconcileQueue:
    def __init__(
        self,
        work: Callable[[Key], Pass],
        *,
        resync: float,
        workers: int = 4,
        requeue_on_write: bool = True,
        max_requeues: int = 10,
        max_backoff: Optional[float] = None,
    ):
        self._work = work
        self.resync = resync
        self.requeue_on_write = requeue_on_write
        self.max_requeues = max_requeues
        self.max_backoff = max_backoff if max_backoff is not None else max(1.0, resync)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        self._slots = asyncio.Semaphore(workers)
        self._running: dict[Key, asyncio.Task] = {}
        self._dirty: set[Key] = set()
        self._later: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}
        # Per key, the versions our last few passes wrote (a follow-up pass may write
        # again before the watch has delivered the first write).
        self._own: dict[Key, deque[str]] = {}
        self._pending: dict[Key, set[str]] = {}  # FineTuneJob versions seen during a pass
        self.passes = 0  # for the log and the tests

    # ---- what the handlers call (on the event loop's thread) ----

    def trigger(self, key: Key, source: str = "event", resource_version: Optional[str] = None) -> None:
        """Reconcile `key` as soon as possible (now, or right after the pass running for it).

        `resource_version`: the FineTuneJob's, when its own watch event asks. The
        event of a status this queue's pass wrote brings nothing new; it may even
        arrive before that pass has returned, so it is only set aside then, and
        dropped once the pass says which version it wrote."""
        if resource_version is not None and self.own_write(key, resource_version):
            return
        TRIGGERS.labels(source=source).inc()
        handle = self._later.pop(key, None)
        if handle is not None:
            handle.cancel()
        if key in self._running:
            if resource_version is not None:
                self._pending.setdefault(key, set()).add(resource_version)
            else:
                self._dirty.add(key)
            return
        loop = asyncio.get_running_loop()
        self._running[key] = loop.create_task(self._run(key, loop.time()), name=f"reconcile {key[0]}/{key[1]}")

    def known(self, key: Key) -> bool:
        """True while the key is running or scheduled."""
        return key in self._running or key in self._later

    def own_write(self, key: Key, resource_version: Optional[str]) -> bool:
        """True when this watch event shows exactly a status one of our recent passes
        wrote: a pass has run (or runs) after it, so it brings nothing new."""
        return resource_version is not None and resource_version in self._own.get(key, ())

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone: no more resyncs (a pass still running ends on its own)."""
        handle = self._later.pop(key, None)
        if handle is not None:
            handle.cancel()
        self._dirty.discard(key)
        self._pending.pop(key, None)
        self._failures.pop(key, None)
        self._own.pop(key, None)

    async def close(self) -> None:
        for handle in self._later.values():
            handle.cancel()
        self._later.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the per-key loop ----

    def _schedule(self, key: Key, delay: float, source: str) -> None:
        handle = self._later.pop(key, None)
        if handle is not None:
            handle.cancel()
        self._later[key] = asyncio.get_running_loop().call_later(delay, self._fire, key, source)

    def _fire(self, key: Key, source: str) -> None:
        self._later.pop(key, None)
        self.trigger(key, source)

    async def _run(self, key: Key, since: float) -> None:
        loop = asyncio.get_running_loop()
        writes_in_a_row = 0
        next_delay: Optional[float] = None
        source = "resync"
        try:
            while True:
                self._dirty.discard(key)
                self._pending.pop(key, None)  # this pass reads the FineTuneJob afresh
                # The context carries kopf's event poster into the worker thread.
                call = functools.partial(contextvars.copy_context().run, self._work, key)
                try:
                    async with self._slots:
                        WAIT.observe(loop.time() - since)
                        self.passes += 1
                        result = await loop.run_in_executor(self._pool, call)
                except RetryLater as e:
                    log.info("reconcile of %s/%s: %s; again in %.1fs", key[0], key[1], e, e.delay)
                    next_delay, source = e.delay, "retry"
                except Exception:
                    failures = self._failures[key] = self._failures.get(key, 0) + 1
                    next_delay, source = min(self.max_backoff, 0.5 * 2 ** failures), "retry"
                    log.exception("reconcile of %s/%s failed (%d in a row); again in %.1fs",
                                  key[0], key[1], failures, next_delay)
                else:
                    self._failures.pop(key, None)
                    next_delay, source = self.resync, "resync"
                    if not result.exists:
                        # Gone: nothing more to schedule, unless a trigger arrived
                        # meanwhile (the name was created again).
                        next_delay = None
                        self._own.pop(key, None)
                    elif result.wrote is None:
                        writes_in_a_row = 0
                    else:
                        self._own.setdefault(key, deque(maxlen=8)).append(result.wrote)
                        writes_in_a_row += 1
                        if not self.requeue_on_write or result.announced or not result.transition:
                            pass
                        elif writes_in_a_row <= self.max_requeues:
                            TRIGGERS.labels(source="requeue").inc()
                            self._dirty.add(key)
                        else:
                            # A reconciler that wrote on every pass would spin: leave it to
                            # the triggers and the resync. Never expected; say so.
                            log.warning("reconcile of %s/%s wrote its status %d passes in a row; "
                                        "not requeued at once", key[0], key[1], writes_in_a_row)
                others = {v for v in self._pending.pop(key, set()) if not self.own_write(key, v)}
                if others:  # someone else changed the FineTuneJob meanwhile
                    self._dirty.add(key)
                if key not in self._dirty:
                    break
                since = loop.time()
        finally:
            self._running.pop(key, None)
        if next_delay is not None:
            self._schedule(key, next_delay, source)
