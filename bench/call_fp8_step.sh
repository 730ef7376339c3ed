#!/bin/bash
# Issue 16 item 2, one device call: the two opt-in changes to the FP8 step, each alone and both.
# (`@swiglu`: where gate, up and down are all frozen, the whole MLP is one FP8 node.)
# First bench/check_fp8.py (its `swiglu` part: the fused SwiGLU rows against the unfused
# arithmetic and their time; its `fast_accum` part: each product with and without cuBLASLt's
# fast accumulation, time and error), then 8B QLoRA at seq 2048 as committed, `@fastacc`
# (KUBETUNE_FP8_FAST_ACCUM=1), `@swiglu` (KUBETUNE_FP8_SWIGLU=1) and both, beside Unsloth 8 x 1,
# in one invocation. Run from the repository root on the GPU machine with .whl and .bench
# carried (sh bench/prepare_device.sh here first). CASES, UNSLOTH, STEPS... override.
source bench/device_env.sh
(cd bench && python3 check_fp8.py --json $OUT/check_fp8.json 2>&1 | grep -v '^ ' | tail -3
 python3 -c "import json; r = json.load(open('$OUT/check_fp8.json')); print(json.dumps({k: r[k] for k in ('swiglu', 'fast_accum', 'failures')}, indent=1))")
CASES=${CASES:-qlora-instruct,qlora-instruct@fastacc,qlora-instruct@swiglu,qlora-instruct@fastacc+swiglu} UNSLOTH=${UNSLOTH-8x1:qlora-instruct} LABEL="${LABEL:-issue 16: fast FP8 accumulation, SwiGLU quantised where made}" STEPS=${STEPS:-12} LOG_EVERY=${LOG_EVERY:-6} DEADLINE=${DEADLINE:-480} \
  exec bash bench/run_8b_cases.sh "$@"
