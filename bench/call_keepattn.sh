#!/bin/bash
# Issue 16, one device call: kept attention outputs (KUBETUNE_KEEP_ATTENTION=1, `@keepattn`) beside
# the default, on 8B QLoRA at seq 2048 and on one 16k-token row of long documents under Unsloth's
# peak (`@b9.6`), with Unsloth 1 x 1 at 16k in the same invocation; each case with a profiled step
# and an empty Triton cache. Run from the repository root on the GPU machine with .whl and .bench
# carried (sh bench/prepare_device.sh here first).
R=$PWD
source bench/device_env.sh
cd /tmp && python3 $R/bench/run.py --model-shape 8b-128k --rows 6000 --rows-longctx 200 \
  --cases ${CASES:-qlora-instruct,qlora-instruct@keepattn,qlora-ctx16384@b9.6,qlora-ctx16384@b9.6+keepattn} \
  --unsloth ${UNSLOTH:-1x1:qlora-ctx16384} --fresh-triton-cache \
  --steps ${STEPS:-10} --warmup 2 --timing events --log-every ${LOG_EVERY:-5} --profile-step ${PROFILE_STEP:-6} \
  --deadline-s ${DEADLINE:-560} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16: kept attention outputs}" "$@"
rc=$?
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
