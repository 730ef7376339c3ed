# Source on the GPU machine, from the repository root: installs the carried
# wheels (.whl/: trl, datasets, bitsandbytes repacked for CUDA 13.0 only,
# liger-kernel, deepspeed built without ops, pydantic, this project) into
# /tmp/site and puts it on PYTHONPATH. The image already has torch,
# transformers, peft, accelerate.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
set +e
python3 - <<'PY'
import importlib.metadata as md
names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger_kernel",
         "deepspeed", "pydantic", "pyarrow", "fsspec", "huggingface_hub", "triton", "kubetune"]
v = {}
for n in names:
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
import json, torch
v["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("VERSIONS " + json.dumps(v), flush=True)
PY
