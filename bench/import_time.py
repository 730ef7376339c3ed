"""Time of the trainer's imports in fresh processes, bitsandbytes imported as
`kubetune train` does (`lazy`: trainer/lazy_compile.py) against the plain way
(`eager`), alternating, N rounds. One JSON line per process, then the medians.

    python3 bench/import_time.py --rounds 3 --out imports.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import sys, time
t0 = time.time()
if sys.argv[1] == "lazy":
    from kubetune.trainer import lazy_compile
    lazy_compile.import_bitsandbytes()
import torch, trl, peft
from transformers import TrainerCallback
import kubetune.trainer.dataset, kubetune.trainer.train
from kubetune.trainer.config import parse_config
print(time.time() - t0, "torch._inductor.compile_fx" in sys.modules)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for i in range(args.rounds):
        for mode in ("eager", "lazy"):
            r = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
            seconds, inductor = r.stdout.split()[-2:]
            row = {"round": i, "mode": mode, "imports_s": round(float(seconds), 2), "inductor_imported": inductor == "True"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {m: statistics.median(r["imports_s"] for r in rows if r["mode"] == m) for m in ("eager", "lazy")}
    print("median " + json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for r in rows + [{"median": summary}]:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
