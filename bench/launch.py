"""The train container's `accelerate launch` line, from the operator's own builder,
made runnable on one benchmark machine.

Only pod-specific values are swapped: the completion index becomes 0, the
rank-0 pod's DNS name becomes loopback, the ConfigMap paths become local
files, and `accelerate` is this interpreter's module. Everything else (process
count, DeepSpeed flags, the DeepSpeed config content) is what a FineTuneJob
with these resources gets in the cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from kubetune.operator import deepspeed, training
from kubetune.operator.api import FineTuneJob
from kubetune.operator.settings import OperatorSettings

JOB, NAMESPACE = "bench", "bench"


def bench_job(method: str, strategy: str, gpus: int, nodes: int = 1) -> FineTuneJob:
    return FineTuneJob.from_body({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": JOB, "namespace": NAMESPACE, "generation": 1, "uid": "u"},
        "spec": {"baseModel": {"uri": "s3://models/bench/"}, "dataset": {"uri": "s3://data/bench.jsonl"},
                 "output": {"uri": "s3://artifacts/bench/"}, "method": {"type": method},
                 "resources": {"nodes": nodes, "gpusPerNode": gpus, "strategy": strategy}},
    })


def launcher_args(method: str, strategy: str, gpus: int, config: Path, ds_file: Path,
                  port: Optional[int] = None) -> tuple[list[str], list[str], Optional[str]]:
    """(launcher argv up to the program, the operator's program argv, DeepSpeed config JSON or None).

    The operator's program is `-m kubetune train --config <path>`; a caller may
    run another program that does the same (the benchmark's timed wrapper)."""
    job = bench_job(method, strategy, gpus)
    settings = OperatorSettings()
    args = training.accelerate_args(job, settings)
    if args[:2] != ["accelerate", "launch"]:
        raise RuntimeError(f"unexpected train command {args[:2]}")
    swap = {
        f"$({training.COMPLETION_INDEX_ENV})": "0",
        # The rank-0 pod's DNS name, whatever the operator names it (found by its flag).
        args[args.index("--main_process_ip") + 1]: "127.0.0.1",
        training.CONFIG_PATH: str(config),
        f"{training.CONFIG_DIR}/{deepspeed.DEEPSPEED_FILE}": str(ds_file),
    }
    if port is not None:
        swap[str(settings.main_process_port)] = str(port)
    program_at = args.index("-m")
    launcher = [sys.executable, "-m", "accelerate.commands.launch"] + [swap.get(a, a) for a in args[2:program_at]]
    program = [swap.get(a, a) for a in args[program_at:]]
    return launcher, program, deepspeed.render(job)
