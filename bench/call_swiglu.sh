#!/bin/bash
# Issue 16 item 2, one device call (prepared, not run yet): the SwiGLU product quantised where
# it is made (KUBETUNE_FP8_SWIGLU=1, `@swiglu`). First bench/check_fp8.py (its `swiglu` part:
# the same scales and codes as the unfused path, the backward against autograd, the time of
# each), then 8B QLoRA at seq 2048 with and without, and the host-kept attention outputs at
# 32k (`@b13.6`, re-measured without record_stream) beside Unsloth 8 x 1 at 2,048 and 1 x 1 at
# 32k, in one invocation. Run from the repository root on the GPU machine with .whl and .bench
# carried (sh bench/prepare_device.sh here first).
source bench/device_env.sh
(cd bench && python3 check_fp8.py --json $OUT/check_fp8.json 2>&1 | grep -v '^ ' | tail -3; grep -A14 '"swiglu"' $OUT/check_fp8.json)
CASES=${CASES:-qlora-instruct,qlora-instruct@swiglu,qlora-ctx32768@b13.6} UNSLOTH=${UNSLOTH-8x1:qlora-instruct,1x1:qlora-ctx32768} LABEL="${LABEL:-issue 16: SwiGLU quantised where made}" STEPS=${STEPS:-12} LOG_EVERY=${LOG_EVERY:-6} DEADLINE=${DEADLINE:-500} \
  exec bash bench/run_8b_cases.sh "$@"
