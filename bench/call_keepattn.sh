#!/bin/bash
# Issue 16, one device call: kept attention outputs (KUBETUNE_KEEP_ATTENTION=1, `@keepattn`) beside
# the default, on 8B QLoRA at seq 2048 and on one 16k-token row of long documents under Unsloth's
# peak (`@b9.6`), with Unsloth 1 x 1 at 16k in the same invocation; each case with a profiled step
# and an empty Triton cache. Run from the repository root on the GPU machine with .whl and .bench
# carried (sh bench/prepare_device.sh here first).
source bench/device_env.sh
CASES=${CASES:-qlora-instruct,qlora-instruct@keepattn,qlora-ctx16384@b9.6,qlora-ctx16384@b9.6+keepattn} UNSLOTH=${UNSLOTH-1x1:qlora-ctx16384} LABEL="${LABEL:-issue 16: kept attention outputs}" DEADLINE=${DEADLINE:-560} \
  exec bash bench/run_8b_cases.sh "$@"
