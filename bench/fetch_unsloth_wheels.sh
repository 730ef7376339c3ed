#!/bin/sh
# Run here (the GPU machine reaches no registry): downloads into .whl/unsloth/
# what Unsloth needs beyond the GPU image and the cases' own wheels, for
# `bench/run.py --unsloth 8x1`, which installs this folder (plus bitsandbytes,
# pydantic, dill and multiprocess from .whl/) into Unsloth's own target,
# /tmp/site-unsloth, never into the cases' /tmp/site: Unsloth pins
# trl <= 1.15.0 and datasets < 5 (4.x, not 4.0.*, 4.1.0, 4.4.*, 4.5.0), the
# cases run trl 1.16.0 and datasets 5.2.0.
#
# Pins: the versions a first trial ran with on the GPU image (issue 16), each
# exact so that a later run installs the same set; datasets 4.8.5 is the newest
# 4.x (trl 1.15.0 needs >= 4.7.0), torchao 0.18.0 wants torch >= 2.11 (the
# image's). Not carried: xformers and flash-attn (no wheel for the image's
# torch 2.11 + CUDA 13 within the 64 MiB the device tool takes; Unsloth runs
# packed rows through torch's own varlen attention without them), diffusers
# (not imported for a text model).
#
# The unsloth wheel is 27 MiB, 25 of them its "studio" web UI (studio/: a
# separate top-level package that `import unsloth` never imports): it is
# repacked without it, as fetch_wheels.sh repacks bitsandbytes, so that the
# folder is about 14 MiB and the whole .whl/ stays well under 64 MiB.
set -e
cd "$(dirname "$0")/.."
mkdir -p .whl/unsloth
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
W="$PWD/.whl/unsloth"
rm -f "$W"/*.whl
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
# pip runs outside the checkout: its folder operator/ would shadow the stdlib.
(cd / && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$W" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 cut_cross_entropy==25.1.1 \
  msgspec==0.23.0 hf_transfer==0.1.9 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 \
  json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0)
u=$(ls "$W"/unsloth-2026.10.9-*.whl)
if unzip -l "$u" | grep -q ' studio/'; then
  tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$u" && rm -rf studio && rm -f "$u" && zip -qr "$u" .)
  rm -rf "$tmp"
fi
# The shared wheels Unsloth's target takes from .whl/ (fetch_wheels.sh downloads them).
for n in bitsandbytes pydantic pydantic_core dill multiprocess; do
  ls .whl/$n-*.whl >/dev/null 2>&1 || echo "warning: no .whl/$n-*.whl: run bench/fetch_wheels.sh too" >&2
done
du -sh "$W" .whl
