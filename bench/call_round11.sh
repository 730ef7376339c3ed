#!/bin/bash
# Issue 16 item 2, eleventh round, one device call. Run from the repository root on the GPU
# machine with .whl and .bench carried (sh bench/prepare_device.sh first; for an @before case, a
# wheel of the round's base commit in .bench/before/). CASES, UNSLOTH, LOSS_CASES choose what
# runs: by default the step as it is now, its two-step profile window (where the GPU idles across
# a step boundary), the cycle collector left alone (@nogcfreeze), and 3 and 4 uncheckpointed
# layers (the memory plan's count is 2 at the 15.6 GiB budget); no Unsloth, no loss check.
source bench/device_env.sh
if ls .bench/before/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-before .bench/before/*.whl || exit 1
fi
TOP=$OUT
OUT=$TOP/speed CASES=${CASES:-qlora-instruct,qlora-instruct@nogcfreeze,qlora-instruct@unckpt3,qlora-instruct@unckpt4} \
  UNSLOTH=${UNSLOTH-} LABEL="${LABEL:-issue 16 round 11: where the GPU idles across steps, the collector, more layers uncheckpointed}" \
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
