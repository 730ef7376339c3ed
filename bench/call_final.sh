#!/bin/bash
# Issue 16, one device call: long context under Unsloth's memory (kubetune with its
# checkpoints offloaded when a row does not fit the budget, Unsloth 1 x 1) and the longest
# kubetune row in 24 GiB; time to the first step before/after the kernel warm-up child and
# the overlapped data preparation (the code before: .bench/before/, a wheel of 94fc5b7),
# every case with an empty Triton cache of its own. Run from the repository root on the GPU
# machine with .whl and .bench carried.
R=$PWD
source bench/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-before .bench/before/*.whl || exit 1
cd /tmp && python3 $R/bench/run.py --model-shape 8b-128k --rows 6000 --rows-longctx 200 \
  --cases ${CASES:-qlora-ctx16384@b9.6,qlora-instruct@before,qlora-instruct,qlora-ctx32768@b13.6,qlora-ctx77824@b24} \
  --unsloth ${UNSLOTH:-1x1:qlora-ctx16384,1x1:qlora-ctx32768} \
  --before-site /tmp/site-before --fresh-triton-cache \
  --steps ${STEPS:-8} --warmup 2 --timing events --log-every ${LOG_EVERY:-4} \
  --deadline-s ${DEADLINE:-575} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16 items 3 and 5}" "$@"
rc=$?
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
