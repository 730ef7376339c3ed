#!/bin/bash
# Issue 16 item 5, seventh round, third device call: bitsandbytes imported without torch's
# compiler stack (trainer/lazy_compile.py), with the job's kernel cache: the first pod
# (compiles, saves), the next pod (`@restart`), the next pod importing bitsandbytes the plain
# way (`@restart+eagerbnb`); then the trainer's imports alone in fresh processes, plain and
# deferred, alternating (bench/import_time.py). Run from the repository root on the GPU
# machine with .whl and .bench carried (sh bench/prepare_device.sh here first).
R=$PWD
CASES=${CASES:-qlora-instruct,qlora-instruct@restart,qlora-instruct@restart+eagerbnb} \
  bash bench/call_kernelcache.sh "$@"
rc=$?
source bench/device_env.sh >/dev/null
cd /tmp && python3 $R/bench/import_time.py --rounds ${ROUNDS:-3} --out $OUT/kcache/import_time.jsonl
exit $rc
