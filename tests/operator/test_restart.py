"""Faults mid-run: the operator killed (SIGKILL) between creating a child and
recording it in status, then restarted; the kube-apiserver crashing under a
running operator. Nothing is created twice and the job still finishes.

This module runs last (alphabetical order): it restarts shared components."""

from __future__ import annotations

import signal

from kubetune.devcluster.cluster import wait_for

from kubetune.devcluster.layout import APISERVER

from .ftj import KWOK_DURATION, Api, body, condition, fleet


def test_sigkill_after_creating_the_train_job(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    first = start_operator(namespace, KUBETUNE_CRASH_AFTER="create-train-job")
    api.create(body("crashy"))

    wait_for("operator to crash at its crash point", lambda: not first.alive(), timeout=90, interval=0.3)
    assert first.proc.returncode == -signal.SIGKILL
    assert "crash point create-train-job reached" in first.log()
    # The train Job exists, but the status never said so.
    rev = api.rev("crashy")
    train_uid = api.job(f"crashy-train-{rev}")["metadata"]["uid"]
    assert api.status("crashy")["phase"] == "Validating"

    start_operator(namespace)
    status = api.wait_phase("crashy", "Serving", timeout=120)
    assert status["conditions"]

    children = api.children("crashy")
    assert children == {
        "Job": [f"crashy-{stage}-{rev}" for stage in ("evaluate", "merge", "train", "validate")],
        "Deployment": ["crashy-serve"],
        "Service": ["crashy-serve", f"crashy-train-{rev}"],
        "ConfigMap": [f"crashy-config-{rev}"],
        "ServiceAccount": ["crashy-trainer"],
        "Role": ["crashy-trainer"],
        "RoleBinding": ["crashy-trainer"],
    }
    assert api.job(f"crashy-train-{rev}")["metadata"]["uid"] == train_uid  # the same Job, not a re-creation
    assert len(api.pods("kubetune.io/job=crashy,kubetune.io/stage=train")) == 1
    # Each transition announced once; the restarted operator may skip a phase
    # it never saw (training finished while no operator ran), never repeat one.
    reasons = [e["reason"] for e in api.events("crashy")]
    assert len(reasons) == len(set(reasons)) and reasons[-1] == "Serving", reasons
    assert reasons[:2] == ["Pending", "Validating"]


def test_job_survives_a_kube_apiserver_crash_mid_training(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    op = start_operator(namespace)
    api.create(body("survivor", podMetadata={"train": {"annotations": {KWOK_DURATION: "6s"}}}))
    api.wait_phase("survivor", "Training", timeout=60)

    cluster.plane.restart(APISERVER)  # SIGKILL, then the same flags and ports again

    status = Api(cluster, namespace).wait_phase("survivor", "Serving", timeout=120)
    assert op.alive(), op.log()[-3000:]
    assert condition(status, "Ready")["status"] == "True"
    children = api.children("survivor")
    rev = api.rev("survivor")
    assert children["Job"] == [f"survivor-{stage}-{rev}" for stage in ("evaluate", "merge", "train", "validate")]
    assert children["Deployment"] == ["survivor-serve"]
    reasons = [e["reason"] for e in api.events("survivor")]
    assert len(reasons) == len(set(reasons)), reasons
