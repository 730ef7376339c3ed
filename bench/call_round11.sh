#!/bin/bash
# Issue 16 item 2, eleventh round, one device call. Run from the repository root on the GPU
# machine with .whl and .bench carried (sh bench/prepare_device.sh first; for an @before case, a
# wheel of the round's base commit in .bench/before/). CASES, UNSLOTH, LOSS_CASES, PROFILE_STEP
# and PROFILE_SPAN choose what runs (each call's settings: bench/RESULTS.md, eleventh round). By
# default the step as it is now beside @before and Unsloth 8 x 1, with a two-step profile window
# (--profile-span: the window holds a step boundary; start it at a step after a log step to
# see a boundary without a host wait); no loss check.
source bench/device_env.sh
if ls .bench/before/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-before .bench/before/*.whl || exit 1
fi
TOP=$OUT
OUT=$TOP/speed CASES=${CASES:-qlora-instruct@before,qlora-instruct} \
  UNSLOTH=${UNSLOTH-8x1:qlora-instruct} LABEL="${LABEL:-issue 16 round 11: the step beside the code before the round and Unsloth 8 x 1}" \
  STEPS=${STEPS:-12} LOG_EVERY=${LOG_EVERY:-6} DEADLINE=${DEADLINE:-470} \
  bash bench/run_8b_cases.sh --before-site /tmp/site-before --profile-span ${PROFILE_SPAN:-2} "$@"
rc=$?
LOSS_CASES=${LOSS_CASES-}
if [ -n "$LOSS_CASES" ]; then
  OUT=$TOP/loss CASES=$LOSS_CASES UNSLOTH= STEPS=${LOSS_STEPS:-100} LOG_EVERY=1 DEADLINE=${LOSS_DEADLINE:-280} \
    LABEL="issue 16 round 11: loss check against bf16 products" \
    bash bench/run_8b_cases.sh "$@" || rc=$?
fi
exit $rc
