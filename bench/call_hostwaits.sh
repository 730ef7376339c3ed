#!/bin/bash
# Issue 16 item 2, sixth round, two device calls: the step without the host waits that
# transformers and TRL put in its forward and backward (TRL's compact LM head finding its
# rows with nonzero(), the packed-rows scan), against the same code with them
# (`@hostwaits`, KUBETUNE_AVOID_HOST_WAITS=0) and without fast accumulation in the input
# gradients (`@nograd`), beside Unsloth 8 x 1: `bash bench/call_hostwaits.sh speed`. Then the
# loss check, 100 steps of the `learn` profile against bf16 products (`@bf16`):
# `bash bench/call_hostwaits.sh loss`. Run from the repository root on the GPU machine with
# .whl and .bench carried (sh bench/prepare_device.sh here first).
source bench/device_env.sh
case "$1" in
  speed)
    OUT=$OUT/speed CASES=${CASES:-qlora-instruct,qlora-instruct@hostwaits,qlora-instruct@nograd} \
      UNSLOTH=${UNSLOTH-8x1:qlora-instruct} LABEL="issue 16: no host waits in the step" \
      STEPS=${STEPS:-10} LOG_EVERY=5 DEADLINE=${DEADLINE:-540} bash bench/run_8b_cases.sh "${@:2}" ;;
  loss)
    OUT=$OUT/loss CASES=${CASES:-qlora-learn,qlora-learn@bf16} UNSLOTH= STEPS=${STEPS:-100} LOG_EVERY=1 \
      DEADLINE=${DEADLINE:-540} LABEL="issue 16: loss check, the sixth round's defaults against bf16 products" \
      bash bench/run_8b_cases.sh "${@:2}" ;;
  *) echo "usage: $0 speed|loss [bench/run.py arguments]" >&2; exit 2 ;;
esac
