#!/bin/bash
# Issue 16 item 5 (start to the first optimizer step <= 30 s on 8B), eighth round, one device
# call: the kernel warm-up child (trainer/kernel_warmup.py) for a pod that finds no kernel
# cache. Every case starts with an empty Triton cache and no kernel cache store (a job's first
# pod); `@nowarm` is the same case without the child, in the same invocation. Then a listing of
# what each case's Triton cache held (the variants each kernel was compiled for). Run from the
# repository root on the GPU machine with .whl and .bench carried (sh bench/prepare_device.sh
# here first).
source bench/device_env.sh
OUT=$OUT/warmup CASES=${CASES:-qlora-instruct@nowarm,qlora-instruct,qlora-ctx16384@b9.6+nowarm,qlora-ctx16384@b9.6} \
  UNSLOTH=${UNSLOTH-} LABEL="issue 16: the kernel warm-up child, a job's first pod with and without it" \
  STEPS=${STEPS:-8} LOG_EVERY=4 DEADLINE=${DEADLINE:-540} \
  bash bench/run_8b_cases.sh "$@"
rc=$?
for d in /tmp/kubetune-bench/triton-*; do
  echo "== $d"
  for e in "$d"/*/; do ls "$e" | tr '\n' ' '; echo; done | sed -E 's/[A-Z2-7]{52}//g' | sort | uniq -c
done > $OUT/warmup/triton_listing.txt 2>&1
exit $rc
