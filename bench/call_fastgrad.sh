#!/bin/bash
# Issue 16 item 2, one device call: fast FP8 accumulation in the input gradients' products too
# (`@fastgrad`, KUBETUNE_FP8_FAST_ACCUM_GRAD=1; opt-in when these calls ran, the default since). Two bench/run.py
# invocations: 8B QLoRA at seq 2048 as committed and `@fastgrad` beside Unsloth 8 x 1; then the
# loss check, 100 steps of the `learn` profile, `@fastgrad` against bf16 products (`@bf16`;
# loss_checks pairs them). Run from the repository root on the GPU machine with .whl and
# .bench carried (sh bench/prepare_device.sh here first). CASES, UNSLOTH, STEPS... override
# the first invocation; LOSS_CASES (empty: none) and LOSS_STEPS the second.
source bench/device_env.sh
TOP=$OUT
OUT=$TOP/speed CASES=${CASES:-qlora-instruct,qlora-instruct@fastgrad} UNSLOTH=${UNSLOTH-8x1:qlora-instruct} \
  LABEL="${LABEL:-issue 16: fast FP8 accumulation in the input gradients}" STEPS=${STEPS:-10} LOG_EVERY=${LOG_EVERY:-5} \
  DEADLINE=${DEADLINE:-270} bash bench/run_8b_cases.sh "$@"
rc=$?
LOSS_CASES=${LOSS_CASES-qlora-learn@fastgrad,qlora-learn@bf16}
if [ -n "$LOSS_CASES" ]; then
  OUT=$TOP/loss CASES=$LOSS_CASES UNSLOTH= STEPS=${LOSS_STEPS:-100} LOG_EVERY=1 DEADLINE=${LOSS_DEADLINE:-300} \
    LABEL="issue 16: loss check, fast accumulation in the input gradients against bf16 products" \
    bash bench/run_8b_cases.sh "$@" || rc=$?
fi
exit $rc
