#!/bin/bash
# Issue 16 item 2, one device call: the GPU checks of the changed kernels (grouped-query
# varlen attention without repeated heads, the LoRA-dropout kernels, the FP8 kernels), then 8B QLoRA at seq
# 2048 on the code before the change (.bench/before/: a wheel of the commit before) and
# after it, in one invocation, each with a profiled step and an empty Triton cache.
# Run from the repository root on the GPU machine with .whl and .bench carried.
R=$PWD
source bench/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-before .bench/before/*.whl || exit 1
mkdir -p $OUT/logs
CHECKS=${CHECKS-attention lora fp8}
case " $CHECKS " in *" attention "*) python3 bench/check_attention.py --json $OUT/check_attention.json 2>&1 | tail -25;; esac
case " $CHECKS " in *" lora "*) python3 bench/check_lora.py 2>&1 | tail -8;; esac
case " $CHECKS " in *" lmhead "*) (cd bench && python3 check_lm_head.py --json $OUT/check_lm_head.json 2>&1 | tail -30);; esac
case " $CHECKS " in *" fp8 "*) (cd bench && python3 check_fp8.py --json $OUT/check_fp8.json 2>&1 | grep -v '^ ' | tail -5; grep -A12 '"kernels"' $OUT/check_fp8.json);; esac
cd /tmp && python3 $R/bench/run.py --model-shape 8b \
  --cases ${CASES:-qlora-instruct@before,qlora-instruct} ${UNSLOTH:+--unsloth $UNSLOTH} \
  --before-site /tmp/site-before --fresh-triton-cache ${COLD:+--cold-cache} \
  --steps ${STEPS:-24} --warmup 3 --timing events --log-every ${LOG_EVERY:-10} --profile-step ${PROFILE_STEP:-8} \
  --deadline-s ${DEADLINE:-540} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16 item 2}" "$@"
rc=$?
tar czf $OUT/${LOGS_TGZ:-logs.tgz} -C $OUT logs && rm -rf $OUT/logs
exit $rc
