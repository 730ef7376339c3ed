#!/bin/bash
# Issue 16 item 3, one device call: long rows with the checkpoints offloaded, each layer's
# attention output kept for its recompute in host memory beside them (the default since it was measured;
# packed_attention.HostKeptAttention) against the same case without (`+nokeep`), at 16k under
# Unsloth's peak (`@b9.6`) and at 32k (`@b13.6`), with Unsloth 1 x 1 at both lengths in the
# same invocation. Run from the repository root on the GPU machine with .whl and .bench carried
# (sh bench/prepare_device.sh here first).
R=$PWD
source bench/device_env.sh
cd /tmp && python3 $R/bench/run.py --model-shape 8b-128k --rows 6000 --rows-longctx 200 \
  --cases ${CASES:-qlora-ctx16384@b9.6,qlora-ctx16384@b9.6+nokeep,qlora-ctx32768@b13.6,qlora-ctx32768@b13.6+nokeep} \
  --unsloth ${UNSLOTH:-1x1:qlora-ctx16384,1x1:qlora-ctx32768} --fresh-triton-cache \
  --steps ${STEPS:-10} --warmup 2 --timing events --log-every ${LOG_EVERY:-5} --profile-step ${PROFILE_STEP:-6} \
  --deadline-s ${DEADLINE:-540} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16: attention outputs kept on the host}" "$@"
rc=$?
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
