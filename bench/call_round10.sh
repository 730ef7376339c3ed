#!/bin/bash
# Issue 16 item 2, tenth round, one device call: the step with this round's kernels (SwiGLU row
# kernels' warps, the LoRA B product added in one pass, the frozen-weight RMSNorm) beside the code
# before them (`@before`: .bench/before/, a wheel of the round's base commit) and Unsloth 8 x 1 in
# the same invocation; then the loss check, 100 steps of the `learn` profile against bf16
# products. Run from the repository root on the GPU machine with .whl and .bench carried (sh
# bench/prepare_device.sh, then a wheel of the base commit in .bench/before/, here first).
source bench/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-before .bench/before/*.whl || exit 1
TOP=$OUT
OUT=$TOP/speed CASES=${CASES:-qlora-instruct@before,qlora-instruct} UNSLOTH=${UNSLOTH-8x1:qlora-instruct} \
  LABEL="${LABEL:-issue 16 round 10: kernels of the round beside the code before them and Unsloth 8 x 1}" \
  STEPS=${STEPS:-12} LOG_EVERY=${LOG_EVERY:-6} DEADLINE=${DEADLINE:-300} bash bench/run_8b_cases.sh --before-site /tmp/site-before "$@"
rc=$?
LOSS_CASES=${LOSS_CASES-qlora-learn,qlora-learn@bf16}
if [ -n "$LOSS_CASES" ]; then
  OUT=$TOP/loss CASES=$LOSS_CASES UNSLOTH= STEPS=${LOSS_STEPS:-100} LOG_EVERY=1 DEADLINE=${LOSS_DEADLINE:-280} \
    LABEL="issue 16 round 10: loss check, kernels of the round against bf16 products" \
    bash bench/run_8b_cases.sh "$@" || rc=$?
fi
exit $rc
