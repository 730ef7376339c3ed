"""GPU check: `kubetune train` under the operator's own `accelerate launch` line, one process,
for each strategy (DDP, DeepSpeed ZeRO-2, ZeRO-3), QLoRA on the benchmark model shape.

Run on the GPU machine after `source bench/device_env.sh`:
    python3 bench/launch_check.py --model-dir /tmp/m8b --steps 4 --out $OUT/launch_check.json
Writes one record per strategy: exit code, wall time, the trainer's last step lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
from launch import launcher_args  # noqa: E402


def adapter_summary(out_dir: Path) -> dict:
    """Tensor count, one shape and whether every lora_B moved off its zero init."""
    from safetensors.torch import load_file

    path = out_dir / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return {"present": False}
    t = load_file(str(path))
    b = [v for k, v in t.items() if "lora_B" in k]
    name = next(iter(sorted(t)))
    return {"present": True, "tensors": len(t), "example": [name, list(t[name].shape)],
            "lora_B_all_nonzero": bool(b) and all(bool(v.abs().sum() > 0) for v in b)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategies", default="ddp,deepspeed-zero2,deepspeed-zero3")
    ap.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    a = ap.parse_args()
    work = Path("/tmp/launch-check")
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    synthetic.make_model(a.model_dir)
    data = work / "data.jsonl"
    synthetic.make_dataset(data, 300, "instruct")
    records = [{"model": "llama-3-8b shape, random bf16", "make_model_s": round(time.time() - t, 1)}]
    for strategy in a.strategies.split(","):
        cfg = work / f"{strategy}.yaml"
        ds_file = work / f"{strategy}-deepspeed.json"
        launcher, program, ds = launcher_args(a.method, strategy, 1, cfg, ds_file)
        args = launcher + program
        if ds:
            ds_file.write_text(ds)
        cfg.write_text(json.dumps({
            "baseModel": {"uri": a.model_dir},
            "dataset": {"uri": str(data), "format": "text", "validationSplit": 0.0, "maxLength": 2048},
            "method": {"type": a.method, "r": 16, "alpha": 32, "targetModules": "all-linear"},
            "training": {"maxSteps": a.steps, "batchSize": 2, "learningRate": 2e-4, "packing": True, "seed": 42,
                         "checkpointEvery": 100000, "logEvery": 1, "strategy": strategy},
            "output": {"uri": str(work / f"out-{strategy}")},
            "storage": {"cacheDir": str(work / "cache")},
        }))
        t = time.time()
        # Run outside the checkout: its top-level kubetune/ folder would shadow the installed package.
        p = subprocess.run(args, capture_output=True, text=True, timeout=240, env={**os.environ}, cwd=work)
        lines = (p.stdout + p.stderr).splitlines()
        rec = {"strategy": strategy, "method": a.method, "rc": p.returncode, "wall_s": round(time.time() - t, 1),
               "launch": " ".join(args[3:]), "steps": [l for l in lines if l.startswith("step ")][-3:],
               "tail": lines[-15:] if p.returncode else lines[-3:], "adapter": adapter_summary(work / f"out-{strategy}")}
        print(json.dumps(rec), flush=True)
        records.append(rec)
        Path(a.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
