#!/bin/bash
# Issue 16 item 4, one device call: 70B QLoRA on one H200. The random
# Llama-3-70B-shaped model is written already quantised (bitsandbytes 4-bit checkpoint,
# about 37 GB: synthetic.make_model_nf4; the bf16 model, 141 GB, does not fit the 64 GiB
# disk) and loaded by the trainer through from_pretrained; seq 2048, the planner's budget
# 48 GiB (the goal's bound); then Unsloth 3 x 1 (the case's 3 x 2048 tokens per step) on the
# same model written again in its own folder (--reference-models regenerate: the disk holds
# one copy; UNSLOTH= leaves it out). Run from the repository root with .whl and .bench carried.
R=$PWD
source bench/device_env.sh
df -h /tmp
cd /tmp && python3 $R/bench/run.py --model-shape 70b-nf4 --cases ${CASES:-qlora-instruct} --qlora-budget-gib ${BUDGET:-48} \
  --unsloth "${UNSLOTH-3x1}" --reference-models regenerate \
  --rows 2000 --steps ${STEPS:-12} --warmup 2 --timing events --log-every ${LOG_EVERY:-6} \
  --deadline-s ${DEADLINE:-560} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16 item 4: 70B QLoRA on one H200}" "$@"
rc=$?
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
