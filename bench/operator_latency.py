"""Operator reaction time on the test control plane: event-driven reconciles
beside the timer-only operator of before, same control plane, same run.

    .venv/bin/python bench/operator_latency.py --out bench/results-operator-latency.json

What is measured, per FineTuneJob, from this process's own watch of the
Jobs (receive times on one monotonic clock, so the watch's delay is on both
ends of a hop and cancels):

- apply -> first Job: from just before the FineTuneJob's create call to the
  ADDED event of its validate Job;
- Job finished -> next stage's Job: from the first event showing a stage Job
  finished (SuccessCriteriaMet or Complete) to the ADDED event of the next
  stage's Job (validate -> train -> merge -> evaluate: three hops a job).

Each mode gets a fresh namespace and its own operator process (`kubetune
operator`, as in production and as tests/operator/conftest.py starts it,
under the chart's ClusterRole through a ServiceAccount token), one after the
other so that they never compete for the CPU. The FineTuneJobs arrive
`--spacing` seconds apart and their pods run `--run-duration` each (kwok
completes them), so several jobs are in flight at once, as on a shared
cluster; serving is off (a Deployment is not a Job hop). `--spacing 0` is the
burst case: every FineTuneJob at once.

This is a benchmark, not a test: it asserts nothing and prints the figures
and the conditions (machine, versions, intervals) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from kubetune.contract.facts import GROUP, LABEL_JOB, LABEL_STAGE, PLURAL, VERSION
from kubetune.devcluster import controlplane, versions
from kubetune.devcluster.cluster import RESTRICTED_LABELS, Cluster, wait_for
from kubetune.devcluster.fakenodes import DEFAULT_GPU_PRODUCT
from kubetune.devcluster.processes import free_ports
from kubetune.operator import rbac
from kubetune.operator.crdgen import CRD_PATH
from kubetune.operator.settings import OperatorSettings

KUBETUNE = Path(sys.executable).with_name("kubetune")
STAGES = ("validate", "train", "merge", "evaluate")
# kwok reads these pod annotations (kubetune/devcluster/kwok.yaml).
KWOK_MESSAGE = "kwok.kubetune.io/termination-message"
KWOK_DURATION = "kwok.kubetune.io/run-duration"
VALIDATE_OK = {"stage": "validate", "ok": True, "reason": "DatasetValid", "message": "120 rows valid", "rows": 120}
EVALUATE_OK = {"stage": "evaluate", "ok": True, "reason": "GatePassed", "message": "gate passed", "passed": True,
               "baseLoss": 2.0, "tunedLoss": 1.5, "improvement": 0.25}
OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_ACCOUNT = "kubetune-operator"


def finetunejob(name: str, run_duration: str) -> dict[str, Any]:
    msg = lambda obj: json.dumps(obj, separators=(",", ":"))  # noqa: E731
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama/"},
            "dataset": {"uri": "s3://data/support.jsonl"},
            "method": {"type": "lora"},
            "resources": {"gpuType": DEFAULT_GPU_PRODUCT, "cpu": "1", "memory": "2Gi", "shmSize": "1Gi"},
            "output": {"uri": f"s3://artifacts/{name}/"},
            "serving": {"enabled": False},
            "podMetadata": {
                "all": {"annotations": {KWOK_DURATION: run_duration}},
                "validate": {"annotations": {KWOK_MESSAGE: msg(VALIDATE_OK)}},
                "evaluate": {"annotations": {KWOK_MESSAGE: msg(EVALUATE_OK)}},
            },
        },
    }


# ---------------------------------------------------------------- set-up


def operator_kubeconfig(cluster: Cluster, directory: Path) -> Path:
    """The operator's ServiceAccount bound to the chart's ClusterRole (rbac.cluster_role())."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = cluster.api_client()
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)

    def ignore_exists(create):
        try:
            create()
        except ApiException as e:
            if e.status != 409:
                raise

    ignore_exists(lambda: core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}}))
    wait_for("default ServiceAccount", lambda: any(
        sa.metadata.name == "default" for sa in core.list_namespaced_service_account(OPERATOR_NAMESPACE).items))
    ignore_exists(lambda: core.create_namespaced_service_account(OPERATOR_NAMESPACE, {"metadata": {"name": OPERATOR_ACCOUNT}}))
    ignore_exists(lambda: rbac_api.create_cluster_role(rbac.cluster_role()))
    ignore_exists(lambda: rbac_api.create_cluster_role_binding({
        "metadata": {"name": rbac.CLUSTER_ROLE_NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": rbac.CLUSTER_ROLE_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}],
    }))
    token = core.create_namespaced_service_account_token(
        OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 7200}}).status.token
    path = directory / "operator-kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "bench", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_cert)}}],
        "users": [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "bench", "user": OPERATOR_ACCOUNT}}],
        "current-context": "operator",
    }))
    return path


def start_operator(kubeconfig: Path, namespace: str, log_path: Path, env_extra: dict[str, str],
                   profile: Optional[Path] = None) -> tuple[subprocess.Popen, int]:
    metrics_port, health_port = free_ports(2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")},
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_METRICS_PORT": str(metrics_port),
        "KUBETUNE_TRAINER_IMAGE": "registry.test/kubetune:test",
        "KUBETUNE_VLLM_IMAGE": "registry.test/vllm:test",
        **env_extra,
    }
    with open(log_path, "wb") as log:
        # --profile: the event loop's thread under cProfile (kopf's watch handling; the passes run in threads).
        prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else []
        proc = subprocess.Popen(
            [*prefix, str(KUBETUNE), "operator", "--namespace", namespace, "--liveness", f"http://127.0.0.1:{health_port}/healthz"],
            env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for("operator liveness endpoint", healthy, timeout=60, interval=0.3)
    return proc, metrics_port


def scrape(port: int) -> dict[str, float]:
    """The operator's Prometheus series (`name{labels}` -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kubetune_"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- measuring


class JobWatch:
    """Receive times of each stage Job's creation and end, from a watch of the namespace's Jobs."""

    def __init__(self, cluster: Cluster, namespace: str):
        from kubernetes import client, watch

        self.batch = client.BatchV1Api(cluster.api_client())
        self.namespace = namespace
        self.created: dict[tuple[str, str], float] = {}   # (ftj, stage) -> t
        self.finished: dict[tuple[str, str], float] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def start(self) -> "JobWatch":
        self._thread.start()
        self._ready.wait(30)
        return self

    def stop(self) -> None:
        self._watch.stop()

    def _run(self) -> None:
        listing = self.batch.list_namespaced_job(self.namespace, label_selector=LABEL_JOB)
        rv = listing.metadata.resource_version
        self._ready.set()
        while True:
            for event in self._watch.stream(self.batch.list_namespaced_job, self.namespace, label_selector=LABEL_JOB,
                                            resource_version=rv, timeout_seconds=600, deserialize=False):
                now = time.monotonic()
                obj = event["object"] if isinstance(event, dict) else json.loads(event)["object"]
                meta = obj["metadata"]
                rv = meta.get("resourceVersion", rv)
                labels = meta.get("labels") or {}
                key = (labels.get(LABEL_JOB), labels.get(LABEL_STAGE))
                if key[1] not in STAGES:
                    continue
                self.created.setdefault(key, now)
                if any(c.get("type") in ("SuccessCriteriaMet", "Complete", "Failed") and c.get("status") == "True"
                       for c in (obj.get("status") or {}).get("conditions") or []):
                    self.finished.setdefault(key, now)
            if self._watch._stop:  # stop() was called
                return


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 0.50), 3), "p99": round(percentile(values, 0.99), 3),
            "max": round(max(values), 3), "mean": round(statistics.fmean(values), 3)}


def run_mode(cluster: Cluster, kubeconfig: Path, workdir: Path, mode: str, env: dict[str, str], args) -> dict[str, Any]:
    from kubernetes import client

    namespace = cluster.create_namespace("bench", labels=RESTRICTED_LABELS)
    custom = client.CustomObjectsApi(cluster.api_client())
    log_path = workdir / f"operator-{mode}.log"
    profile = args.profile / f"operator-{mode}.prof" if args.profile else None
    proc, metrics_port = start_operator(kubeconfig, namespace, log_path, env, profile)
    watch = JobWatch(cluster, namespace).start()
    applied: dict[str, float] = {}
    names = [f"lat-{i:03d}" for i in range(args.jobs)]
    # Warm-up, not measured: the operator's first watches of a new namespace can
    # meet "storage is (re)initializing" (429) and a retry a second later.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, finetunejob("warmup", args.run_duration))
    wait_for(f"{mode}: warm-up validate Job", lambda: ("warmup", "validate") in watch.created,
             timeout=2 * float(env["KUBETUNE_RECONCILE_INTERVAL"]) + 30, interval=0.2)
    cpu_before = cpu_seconds(proc.pid)
    load_before = loadavg()
    metrics_before = scrape(metrics_port)
    started = time.monotonic()
    try:
        for i, name in enumerate(names):
            # Paced against the start, not the previous create: a slow create does not stretch the spacing.
            delay = started + i * args.spacing - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            applied[name] = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, finetunejob(name, args.run_duration))

        def all_done() -> bool:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            failed = [o["metadata"]["name"] for o in items if (o.get("status") or {}).get("phase") == "Failed"]
            if failed:
                raise RuntimeError(f"{mode}: FineTuneJobs failed: {failed}")
            done = {o["metadata"]["name"] for o in items if (o.get("status") or {}).get("phase") == "Succeeded"}
            return done >= set(names)

        wait_for(f"{mode}: {len(names)} FineTuneJobs Succeeded", all_done, timeout=args.timeout, interval=1.0)
        wall = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - cpu_before
        metrics_after = scrape(metrics_port)
    except BaseException:
        print(log_path.read_text()[-6000:], file=sys.stderr)
        raise
    finally:
        watch.stop()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        cluster.delete_namespace(namespace)

    first = [watch.created[(n, "validate")] - applied[n] for n in names]
    hops: list[float] = []
    per_hop: dict[str, list[float]] = {}
    for n in names:
        for before, after in zip(STAGES, STAGES[1:]):
            latency = watch.created[(n, after)] - watch.finished[(n, before)]
            hops.append(latency)
            per_hop.setdefault(f"{before}->{after}", []).append(latency)
    return {
        "mode": mode,
        "operator_env": {k: v for k, v in env.items() if k.startswith("KUBETUNE_RECONCILE")},
        "reconcile_workers": env.get("KUBETUNE_RECONCILE_WORKERS", str(OperatorSettings().reconcile_workers)),
        "apply_to_first_job_s": summary(first),
        "job_finished_to_next_job_s": summary(hops),
        "per_hop_s": {k: summary(v) for k, v in per_hop.items()},
        "wall_s": round(wall, 1),
        "operator_cpu_s": round(cpu, 1),
        # The machine is shared: its 1-minute load average before and after the mode ran.
        "loadavg_1m": [load_before, loadavg()],
        # Over the measured jobs (and the warm-up's end): what asked for passes, how many ran, what they cost.
        "operator_metrics": {k: round(v - metrics_before.get(k, 0.0), 3) for k, v in metrics_after.items()
                             if k.startswith(("kubetune_reconcile_triggers_total", "kubetune_reconcile_duration_seconds",
                                              "kubetune_reconcile_wait_seconds"))},
    }


def conditions(args) -> dict[str, Any]:
    import kopf
    import kubernetes

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
                    "shared": "the 2-core development machine, shared with other sessions' work"},
        "versions": {"python": platform.python_version(), "kopf": kopf.__version__ if hasattr(kopf, "__version__") else
                     _dist_version("kopf"), "kubernetes_client": kubernetes.__version__,
                     "kubernetes": versions.KUBERNETES, "etcd": versions.ETCD, "kwok": versions.KWOK,
                     "kubetune_commit": commit},
        "workload": {"finetunejobs": args.jobs, "spacing_s": args.spacing, "pod_run_duration": args.run_duration,
                     "stages": list(STAGES), "serving": False,
                     "nodes": f"1 CPU node + {args.gpu_nodes} GPU nodes x 8 GPUs (kwok)"},
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between two FineTuneJobs (0: all at once)")
    parser.add_argument("--run-duration", default="1s", help="how long kwok keeps each stage pod Running")
    parser.add_argument("--gpu-nodes", type=int, default=8)
    parser.add_argument("--resync", default="30", help="event-driven mode: the resync interval (the default)")
    parser.add_argument("--timer-interval", default="10", help="timer-only mode: the interval (the old default)")
    parser.add_argument("--modes", default="events,timer",
                        help="comma-separated; events@N: event-driven with KUBETUNE_RECONCILE_WORKERS=N")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, help="append the JSON to this file's list of invocations")
    parser.add_argument("--profile", type=Path, help="a folder: run each operator under cProfile, its stats there")
    args = parser.parse_args(argv)

    def env_of(mode: str) -> dict[str, str]:
        kind, _, workers = mode.partition("@")
        if kind == "timer":
            return {"KUBETUNE_RECONCILE_ON_EVENTS": "0", "KUBETUNE_RECONCILE_INTERVAL": args.timer_interval}
        if kind != "events":
            raise SystemExit(f"unknown mode {mode!r}")
        return {"KUBETUNE_RECONCILE_ON_EVENTS": "1", "KUBETUNE_RECONCILE_INTERVAL": args.resync,
                **({"KUBETUNE_RECONCILE_WORKERS": workers} if workers else {})}

    plane = controlplane.start()
    try:
        cluster = Cluster(plane)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
        workdir = Path(tempfile.mkdtemp(prefix="operator-latency-"))
        kubeconfig = operator_kubeconfig(cluster, workdir)
        # Validate and merge run on the CPU node: big enough for every job at once.
        cluster.create_cpu_node(cpu="1000", memory="4000Gi")
        for _ in range(args.gpu_nodes):
            cluster.create_gpu_node(gpus=8)
        result = conditions(args)
        result["runs"] = []
        for mode in args.modes.split(","):
            print(f"--- {mode}", file=sys.stderr)
            run = run_mode(cluster, kubeconfig, workdir, mode, env_of(mode), args)
            print(json.dumps(run), file=sys.stderr)
            result["runs"].append(run)
    finally:
        plane.stop(remove_run_dir=True)
    print(json.dumps(result, indent=2))
    if args.out:
        # One file, one entry per invocation: runs on a shared machine differ, keep them all.
        history = json.loads(args.out.read_text()) if args.out.exists() else []
        history.append(result)
        args.out.write_text(json.dumps(history, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
