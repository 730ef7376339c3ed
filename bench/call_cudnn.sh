#!/bin/bash
# Issue 16, one device call: cuDNN's fused attention (KUBETUNE_ATTENTION_KERNEL=cudnn, `@cudnn`)
# against the flash kernel. First the kernel check (bench/check_cudnn_attention.py: times and
# errors per packing), then 8B QLoRA at seq 2048 and one 16k-token row of long documents under
# Unsloth's peak (`@b9.6`), each with and without, with Unsloth 1 x 1 at 16k in the same
# invocation. Run from the repository root on the GPU machine with .whl and .bench carried
# (sh bench/prepare_device.sh here first).
R=$PWD
source bench/device_env.sh
python3 $R/bench/check_cudnn_attention.py --json $OUT/check_cudnn_attention.json
cd /tmp && python3 $R/bench/run.py --model-shape 8b-128k --rows 6000 --rows-longctx 200 \
  --cases ${CASES:-qlora-instruct,qlora-instruct@cudnn,qlora-ctx16384@b9.6,qlora-ctx16384@b9.6+cudnn} \
  --unsloth ${UNSLOTH:-1x1:qlora-ctx16384} --fresh-triton-cache \
  --steps ${STEPS:-10} --warmup 2 --timing events --log-every ${LOG_EVERY:-5} --profile-step ${PROFILE_STEP:-6} \
  --deadline-s ${DEADLINE:-470} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16: cuDNN attention}" "$@"
rc=$?
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
