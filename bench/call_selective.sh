#!/bin/bash
# Issue 16 item 2, ninth round: what a layer left uncheckpointed costs in memory and saves in
# time at 8B, seq 2048 (the plan leaves none at the 15.6 GiB budget), with and without kept
# attention outputs: `unckpt<N>` sets the count whatever the plan says.
# Run from the repository root on the GPU machine with .whl and .bench carried (sh
# bench/prepare_device.sh here first).
source bench/device_env.sh
OUT=$OUT/selective CASES=${CASES:-qlora-instruct,qlora-instruct@unckpt1,qlora-instruct@unckpt2,qlora-instruct@unckpt3,qlora-instruct@keepattn,qlora-instruct@unckpt1+keepattn} \
  UNSLOTH=${UNSLOTH-} LABEL="issue 16: layers left uncheckpointed at 8B, seq 2048: memory and time each" \
  STEPS=${STEPS:-10} LOG_EVERY=5 DEADLINE=${DEADLINE:-560} bash bench/run_8b_cases.sh "$@"
