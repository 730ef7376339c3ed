"""Deterministic names of a FineTuneJob's children.

A handler that runs twice (operator restart mid-step) computes the same names,
finds the objects it created before, and creates nothing twice. Children of
one revision (its stage Jobs, their ConfigMap and headless Service) carry the
revision id, so two revisions of a job can exist side by side; the RBAC
objects and the serving Deployment belong to the job.
"""

from __future__ import annotations


def stage_job(job: str, stage: str, rev: str) -> str:
    # "<job>-evaluate-<rev>": 40 + 10 + 10 characters, within a 63-character label value.
    return f"{job}-{stage}-{rev}"


def config_map(job: str, rev: str) -> str:
    return f"{job}-config-{rev}"


def train_service(job: str, rev: str) -> str:
    """Headless Service giving the train pods stable DNS (pod subdomain)."""
    return f"{job}-train-{rev}"


def train_pod_host(job: str, rev: str, index: int, namespace: str) -> str:
    """DNS name of the train pod with completion index `index` (Indexed Job
    pods get hostname `<job-name>-<index>` and the Service as subdomain)."""
    return f"{stage_job(job, 'train', rev)}-{index}.{train_service(job, rev)}.{namespace}.svc"


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


def canary(job: str) -> str:
    """The canary Deployment and Service of a new revision (serving.canary)."""
    return f"{job}-canary"
