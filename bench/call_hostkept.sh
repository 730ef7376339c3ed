#!/bin/bash
# Issue 16 item 3, one device call: long rows with the checkpoints offloaded, each layer's
# attention output kept for its recompute in host memory beside them (the default since it was measured;
# packed_attention.HostKeptAttention) against the same case without (`+nokeep`), at 16k under
# Unsloth's peak (`@b9.6`) and at 32k (`@b13.6`), with Unsloth 1 x 1 at both lengths in the
# same invocation. Run from the repository root on the GPU machine with .whl and .bench carried
# (sh bench/prepare_device.sh here first).
source bench/device_env.sh
CASES=${CASES:-qlora-ctx16384@b9.6,qlora-ctx16384@b9.6+nokeep,qlora-ctx32768@b13.6,qlora-ctx32768@b13.6+nokeep} UNSLOTH=${UNSLOTH-1x1:qlora-ctx16384,1x1:qlora-ctx32768} LABEL="${LABEL:-issue 16: attention outputs kept on the host}" \
  exec bash bench/run_8b_cases.sh "$@"
