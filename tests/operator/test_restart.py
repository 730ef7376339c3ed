"""The operator killed (SIGKILL) between creating a child and recording it in
status, then restarted: nothing is created twice and the job still finishes."""

from __future__ import annotations

import signal

from kubetune.devcluster.cluster import wait_for

from .ftj import Api, body, fleet


def test_sigkill_after_creating_the_train_job(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    first = start_operator(namespace, KUBETUNE_CRASH_AFTER="create-train-job")
    api.create(body("crashy"))

    wait_for("operator to crash at its crash point", lambda: not first.alive(), timeout=90, interval=0.3)
    assert first.proc.returncode == -signal.SIGKILL
    assert "crash point create-train-job reached" in first.log()
    # The train Job exists, but the status never said so.
    train_uid = api.job("crashy-train")["metadata"]["uid"]
    assert api.status("crashy")["phase"] == "Validating"

    start_operator(namespace)
    status = api.wait_phase("crashy", "Serving", timeout=120)
    assert status["conditions"]

    children = api.children("crashy")
    assert children == {
        "Job": ["crashy-evaluate", "crashy-merge", "crashy-train", "crashy-validate"],
        "Deployment": ["crashy-serve"],
        "Service": ["crashy-serve", "crashy-train"],
        "ConfigMap": ["crashy-config"],
        "ServiceAccount": ["crashy-trainer"],
        "Role": ["crashy-trainer"],
        "RoleBinding": ["crashy-trainer"],
    }
    assert api.job("crashy-train")["metadata"]["uid"] == train_uid  # the same Job, not a re-creation
    assert len(api.pods("kubetune.io/job=crashy,kubetune.io/stage=train")) == 1
    # Each transition announced once; the restarted operator may skip a phase
    # it never saw (training finished while no operator ran), never repeat one.
    reasons = [e["reason"] for e in api.events("crashy")]
    assert len(reasons) == len(set(reasons)) and reasons[-1] == "Serving", reasons
    assert reasons[:2] == ["Pending", "Validating"]
