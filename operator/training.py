"""The train stage: an Indexed Job (one pod per node) behind a headless Service,
each pod running `accelerate launch` with its machine rank (pure builders).

Pod `i` of Indexed Job `<job>-train` gets hostname `<job>-train-i` and, with the
Service as its subdomain, the stable DNS name `<job>-train-i.<job>-train.<ns>.svc`;
rank 0's name is the rendezvous address of every rank.
"""

from __future__ import annotations

from typing import Any

from . import deepspeed, names, pods, revisions
from .api import FineTuneJob
from kubetune.contract.facts import ANNOTATION_COMPLETION_INDEX, CONFIG_DIR, CONFIG_PATH
from .settings import OperatorSettings
from .stage_jobs import _cpu_resources, batch_job, container, pod_spec

COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"


def accelerate_args(job: FineTuneJob, settings: OperatorSettings) -> list[str]:
    r = job.spec.resources
    name, ns, rev = job.metadata.name, job.metadata.namespace, revisions.of(job)
    world = r.nodes * r.gpus_per_node
    args = [
        "accelerate",
        "launch",
        "--num_machines", str(r.nodes),
        "--num_processes", str(world),
        # Expanded by the kubelet from the env var the Job controller sets.
        "--machine_rank", f"$({COMPLETION_INDEX_ENV})",
        "--main_process_ip", names.train_pod_host(name, rev, 0, ns),
        "--main_process_port", str(settings.main_process_port),
        "--dynamo_backend", "no",
    ]
    if r.strategy == "ddp":
        if world > 1:
            args.append("--multi_gpu")
    else:
        args += [
            "--use_deepspeed",
            "--deepspeed_config_file", f"{CONFIG_DIR}/{deepspeed.DEEPSPEED_FILE}",
            # Each pod starts its own local ranks (no pdsh/ssh between pods).
            "--deepspeed_multinode_launcher", "standard",
        ]
    args += ["-m", "kubetune", "train", "--config", CONFIG_PATH]
    return args


def train_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    r = job.spec.resources
    volumes, mounts = pods.stage_volumes(job, revisions.of(job), shm_size=r.shm_size)
    env = [
        # The Job controller sets this too; declaring it from the pod
        # annotation keeps $(JOB_COMPLETION_INDEX) expansion independent of
        # the order in which the controller injects it.
        {
            "name": COMPLETION_INDEX_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_COMPLETION_INDEX}']"}},
        },
        {"name": "NCCL_DEBUG", "value": "WARN"},
    ]
    c = container(job, settings, accelerate_args(job, settings), mounts, _cpu_resources(job, gpus=r.gpus_per_node), env)
    c["ports"] = [{"name": "rendezvous", "containerPort": settings.main_process_port}]
    pod = pod_spec(job, settings, [c], volumes, gpu_type=r.gpu_type, automount_token=True)
    pod["subdomain"] = names.train_service(job.metadata.name, revisions.of(job))
    return batch_job(
        job,
        "train",
        pod,
        # Ranks train as one gang: a replacement for one failed rank would wait for peers that
        # are themselves stuck in a collective. So the first failed pod fails the Job (the Job
        # controller stops the other ranks) and the operator restarts the whole gang from the
        # newest complete checkpoint, up to spec.resources.maxRestarts (lifecycle.decide).
        backoff_limit=0,
        extra={
            "completions": r.nodes,
            "parallelism": r.nodes,
            "completionMode": "Indexed",
        },
    )


def train_service(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    rev = revisions.of(job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": pods.metadata(job, names.train_service(job.metadata.name, rev), "train", rev=rev),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve before any pod is Ready: ranks rendezvous first.
            "publishNotReadyAddresses": True,
            "selector": pods.selector_labels(job, "train", rev),
            "ports": [{"name": "rendezvous", "port": settings.main_process_port, "targetPort": settings.main_process_port}],
        },
    }
