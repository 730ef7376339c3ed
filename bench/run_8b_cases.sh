#!/bin/bash
# The bench/run.py invocation the issue-16 device calls share (call_keepattn.sh, call_hostkept.sh,
# call_fp8_step.sh set CASES, UNSLOTH, LABEL and the rest, then run this): the Llama-3.1-8B shape
# with its 128k vocabulary, 6,000 instruct rows and 200 long-context rows, an empty Triton cache
# per case, CUDA-event step clock, one profiled step; logs packed into $OUT/logs.tgz.
# Extra bench/run.py arguments may follow (they override the ones here).
R=$PWD
cd /tmp && python3 $R/bench/run.py --model-shape 8b-128k --rows 6000 --rows-longctx 200 \
  --cases "$CASES" --unsloth "$UNSLOTH" --fresh-triton-cache \
  --steps ${STEPS:-10} --warmup 2 --timing events --log-every ${LOG_EVERY:-5} --profile-step ${PROFILE_STEP:-6} \
  --deadline-s ${DEADLINE:-540} --logs $OUT/logs --out $OUT --label "$LABEL" "$@"
rc=$?
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
