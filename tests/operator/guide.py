"""The console blocks of docs/multi-tenancy.md as test steps: each `$ kubectl ...`
line and the output shown under it, run with the cluster's kubectl (the
version of the server) from the repository root."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass

from kubetune.operator.packaging import ROOT

GUIDE = ROOT / "docs" / "multi-tenancy.md"
TEARDOWN_HEADING = "## Tear down"
# A walkthrough of its own after the main one (tests/operator/test_fair_sharing.py).
FAIR_SHARING_HEADING = "## Fair sharing"
FAIR_SHARING_TEARDOWN_HEADING = "### Tear down"


@dataclass
class Step:
    command: str
    expected: list[str]  # output lines the guide shows ("..." stands for text that varies, e.g. an age)
    returncode: int = -1
    output: str = ""


def guide_steps(text: str, teardown_heading: str = TEARDOWN_HEADING) -> tuple[list[Step], list[Step]]:
    """(setup, teardown): the `$ kubectl ...` lines of the guide's console blocks and the output under each."""
    setup: list[Step] = []
    teardown: list[Step] = []
    target = setup
    in_block = False
    for line in text.splitlines():
        if line.startswith(teardown_heading):
            target = teardown
        if line.startswith("```console"):
            in_block = True
            continue
        if in_block and line.startswith("```"):
            in_block = False
            continue
        if not in_block:
            continue
        if line.startswith("$ "):
            target.append(Step(line[2:], []))
        elif line.strip():
            target[-1].expected.append(line)
    return setup, teardown


def run_step(cluster, step: Step) -> Step:
    argv = shlex.split(step.command)
    # Only kubectl: the guide is a platform admin's session, nothing else runs.
    assert argv[0] == "kubectl", step.command
    result = subprocess.run([str(cluster.kubectl_binary), f"--kubeconfig={cluster.kubeconfig}", *argv[1:]],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    step.returncode = result.returncode
    step.output = result.stdout + result.stderr
    return step


def shows(output: str, expected: str) -> bool:
    """`expected` (its '...' parts matching anything) is one line of `output`, spacing aside."""
    pattern = r"\s+".join(".*?".join(re.escape(part) for part in word.split("...")) for word in expected.split())
    return any(re.fullmatch(pattern, line.strip()) for line in output.splitlines())
