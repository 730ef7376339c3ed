"""Deterministic names of a FineTuneJob's children.

A handler that runs twice (operator restart mid-step) computes the same names,
finds the objects it created before, and creates nothing twice.
"""

from __future__ import annotations

STAGES = ("validate", "train", "merge", "evaluate", "serve")


def stage_job(job: str, stage: str) -> str:
    if stage not in STAGES or stage == "serve":
        raise ValueError(f"no Job for stage {stage!r}")
    return f"{job}-{stage}"


def config_map(job: str) -> str:
    return f"{job}-config"


def train_service(job: str) -> str:
    """Headless Service giving the train pods stable DNS (pod subdomain)."""
    return f"{job}-train"


def train_pod_host(job: str, index: int, namespace: str) -> str:
    """DNS name of the train pod with completion index `index` (Indexed Job
    pods get hostname `<job-name>-<index>` and the Service as subdomain)."""
    return f"{stage_job(job, 'train')}-{index}.{train_service(job)}.{namespace}.svc"


def trainer_account(job: str) -> str:
    """ServiceAccount, Role and RoleBinding of the job's pods."""
    return f"{job}-trainer"


def cleanup(job: str, uid: str) -> str:
    """The Job deleting a job's artifacts when it is deleted (deleteOnJobDeletion).
    It outlives the FineTuneJob for a while, so the name carries the uid: a new
    job of the same name gets its own cleanup."""
    return f"{job}-cleanup-{uid.replace('-', '')[:8]}"


def serving(job: str) -> str:
    """vLLM Deployment and its Service."""
    return f"{job}-serve"
