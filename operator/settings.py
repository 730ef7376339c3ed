"""Operator settings, read once from the environment at startup.

Everything a platform team tunes per installation (images, timings, retry
limits) lives here; the Helm chart sets these variables. Builders receive an
`OperatorSettings` instead of reading the environment themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping, Optional

from kubetune.contract import vllm

ENV_PREFIX = "KUBETUNE_"
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class OperatorSettings:
    # Image of the trainer stages (validate/train/merge/evaluate); spec.image overrides it.
    trainer_image: str = "ghcr.io/kubetune/kubetune:0.1.0"
    # The pinned vLLM release (kubetune/contract/vllm.py): the trainer writes merged/ for its transformers.
    vllm_image: str = vllm.IMAGE
    # Serving (merged mode). Loading weights takes minutes: the startup probe allows this long.
    serving_startup_seconds: int = 1800
    # On top of the startup budget before the Deployment reports ProgressDeadlineExceeded: the image pull
    # and the init container's checksum pass over every weight file.
    serving_progress_margin_seconds: int = 1200
    # Container restarts of a serving pod (crash loop) after which the serve stage fails.
    serving_max_restarts: int = 5
    # Graceful drain: the pod leaves the Service's endpoints during preStop, then vLLM finishes
    # in-flight requests for up to drain seconds after SIGTERM (--shutdown-timeout).
    serving_prestop_seconds: int = 10
    serving_drain_seconds: int = 60
    # Namespaces (comma-separated) whose pods may reach every vLLM port besides the job's own namespace:
    # the platform's ingress controller, its Prometheus. An installation setting, not a spec field: a
    # FineTuneJob names nothing outside its namespace (docs/multi-tenancy.md).
    serving_allowed_namespaces: str = ""
    # Adapter mode: GPU slots (--max-loras) of a shared server at most. Each slot reserves GPU memory for
    # an adapter of the server's --max-lora-rank on every layer; adapters beyond it wait in the CPU
    # cache (--max-cpu-loras holds them all) and are swapped in per request.
    adapter_max_gpu_loras: int = 8
    image_pull_policy: str = "IfNotPresent"
    # Reconciles follow events (the FineTuneJob's and its children's); this is
    # the resync, the safety net for what no watched object announces (a
    # ServiceAccount or Secret created later) and for a missed watch event.
    # Each FineTuneJob is looked at again this long after its last pass.
    reconcile_interval: float = 30.0
    # Off: the timer alone drives reconciles, as before events (kept for the
    # latency benchmark's baseline, bench/operator_latency.py).
    reconcile_on_events: bool = True
    # Reconciles of different FineTuneJobs that may run at once (threads, mostly
    # waiting on the API server; one FineTuneJob is never reconciled twice at once).
    # 4, measured (bench/operator_latency.py, 50 jobs, 2-core machine, runs
    # interleaved): Job finished -> next Job p99 0.6-1.1 s with 4 workers,
    # 1.7-6.7 s with 8 (each pass ~3x slower), 1.2-2.5 s with 2 (queueing).
    reconcile_workers: int = 4
    # How often a deletion held for the artifact cleanup Job checks on it.
    cleanup_poll_interval: float = 2.0
    # Retries of a failed training pod (preemptions, marked DisruptionTarget, are not counted).
    stage_backoff_limit: int = 0
    validate_deadline_seconds: int = 1800
    main_process_port: int = 29500
    # UID/GID the stage containers run as (the trainer image's non-root user).
    run_as_user: int = 1000
    # kopf watch timeouts (seconds): the server ends a watch after server_timeout,
    # the client gives up after client_timeout, so a silently dead connection is
    # noticed instead of leaving the operator blind.
    watch_server_timeout: int = 300
    watch_client_timeout: int = 330
    metrics_port: int = 8080
    # Test-only fault injection: the operator process SIGKILLs itself right
    # after the named step (e.g. "create-train-job"). Empty in production.
    crash_after: str = ""

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "OperatorSettings":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            if kind is bool:  # bool("0") is True
                if raw.lower() not in _BOOLS:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: expected one of {sorted(_BOOLS)}, got {raw!r}")
                values[f.name] = _BOOLS[raw.lower()]
                continue
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: expected {kind.__name__}, got {raw!r}") from None
        return cls(**values)
