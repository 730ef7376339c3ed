#!/bin/sh
# Run here (not on the GPU machine, which reaches no registry): downloads into
# .whl/ the wheels the GPU image lacks, for its Python 3.12 on x86-64, then
# builds this project's wheel and copies the reference recipe
# (bench/prepare_device.sh). On the GPU machine `source bench/device_env.sh`
# installs them (bench/fetch_unsloth_wheels.sh, run at the end, adds .whl/unsloth/,
# which bench/run.py --unsloth installs into a target of its own). The image already has torch, transformers, peft, accelerate,
# triton, numpy, pandas, pyarrow, rich, typer, safetensors.
#
# bitsandbytes ships one native library per CUDA release (about 20 MiB
# each); only the CUDA 13.0 one is kept, so that the whole folder stays under
# the device tool's 64 MiB limit. DeepSpeed has no wheel: it is built here
# as pure Python (DS_BUILD_OPS=0; its optional fused ops are not needed by
# the trainer, which uses torch's fused AdamW).
set -e
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo /.bench/ >> .git/info/exclude
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
pin() { grep -i "^$1==" requirements.lock | head -1; }
for p in trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection; do
  spec=$(pin "$p"); [ -n "$spec" ] || { echo "no pin for $p in requirements.lock" >&2; exit 1; }
  set -- "$@" "$spec"
done
# pip runs outside the checkout: its folder operator/ would shadow the stdlib.
W="$PWD/.whl"
(cd / && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$W" \
  "$@" bitsandbytes==0.50.2 liger-kernel==0.8.5 hjson==3.1.0)
# bitsandbytes: keep the CUDA 13.0 library only.
bnb=$(ls .whl/bitsandbytes-*.whl)
if unzip -l "$bnb" | grep -q 'libbitsandbytes_cuda12'; then
  tmp=$(mktemp -d); (cd "$tmp" && unzip -q "$OLDPWD/$bnb" && find . -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete \
    && rm -f "$OLDPWD/$bnb" && zip -qr "$OLDPWD/$bnb" .); rm -rf "$tmp"
fi
# DeepSpeed: pure-Python wheel. Its setup.py imports torch, so it is built in
# a throwaway venv holding the lock's torch (from the uv cache).
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  b=$(mktemp -d)
  uv venv -q "$b/venv" && uv pip install -q --python "$b/venv/bin/python" "$(pin torch)" setuptools wheel pip packaging \
    && (cd "$b" && DS_BUILD_OPS=0 "$b/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8)
  rm -rf "$b"
fi
# Unsloth's own wheels, for `bench/run.py --unsloth` (its own install target on the GPU machine).
sh bench/fetch_unsloth_wheels.sh
sh bench/prepare_device.sh
ls -la .whl
