#!/bin/bash
# Issue 16 item 5 (start to the first optimizer step <= 30 s on 8B), seventh round, one
# device call: the job's kernel cache (trainer/kernel_cache.py). Every case starts with an
# empty Triton cache (a fresh pod); the cases share one kernel cache store, as the pods of
# one job do: the first 2,048-token case compiles and saves, `@restart` is the job's next pod
# (it restores them), `@restart+firstprof` the same with its first step's host functions
# profiled (cProfile: where a restored pod's first step still goes); the 16k case restores
# those and compiles what its shapes add, its `@restart` finds all. Then a listing of what
# each case's Triton cache held. Run from the repository root on the GPU machine with .whl
# and .bench carried (sh bench/prepare_device.sh here first).
source bench/device_env.sh
OUT=$OUT/kcache CASES=${CASES:-qlora-instruct,qlora-instruct@restart,qlora-instruct@restart+firstprof,qlora-ctx16384@b9.6,qlora-ctx16384@b9.6+restart} \
  UNSLOTH=${UNSLOTH-} LABEL="issue 16: the job's kernel cache, first pod against the next" \
  STEPS=${STEPS:-8} LOG_EVERY=4 DEADLINE=${DEADLINE:-540} \
  bash bench/run_8b_cases.sh --kernel-cache "$@"
rc=$?
for d in /tmp/kubetune-bench/triton-*; do
  echo "== $d"
  for e in "$d"/*/; do ls "$e" | tr '\n' ' '; echo; done | sed -E 's/[A-Z2-7]{52}//g' | sort | uniq -c
done > $OUT/kcache/triton_listing.txt 2>&1
ls -la /tmp/kubetune-bench/kernel-cache >> $OUT/kcache/triton_listing.txt 2>&1
exit $rc
