#!/bin/bash
# Issue 16 item 5 (start to the first optimizer step <= 30 s on 8B), eighth round: the kernel
# warm-up children (trainer/kernel_warmup.py) for a pod that finds no kernel cache.
#   bash bench/call_warmup.sh         every case starts with an empty Triton cache and no
#                                     kernel cache store (a job's first pod); `@nowarm` is the
#                                     same case without the children, in the same invocation;
#                                     then a listing of what each case's Triton cache held
#                                     (the variants each kernel was compiled for)
#   bash bench/call_warmup.sh speed   item 2 on the same code: 8B at 2,048, 10 steps, beside
#                                     Unsloth 8 x 1
# Run from the repository root on the GPU machine with .whl and .bench carried (sh
# bench/prepare_device.sh here first).
source bench/device_env.sh
if [ "$1" = speed ]; then
  OUT=$OUT/speed CASES=${CASES:-qlora-instruct,qlora-instruct@nowarm} UNSLOTH=${UNSLOTH-8x1:qlora-instruct} \
    LABEL="issue 16: the eighth round's code (kernel warm-up) beside Unsloth" \
    STEPS=${STEPS:-10} LOG_EVERY=5 DEADLINE=${DEADLINE:-540} bash bench/run_8b_cases.sh "${@:2}"
  exit $?
fi
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
