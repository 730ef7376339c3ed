#!/bin/bash
# Issue 16 item 3, one device call: 8B QLoRA on packed rows of 16k and 32k tokens,
# kubetune (every layer checkpointed, the planner's budget 80 GiB) and Unsloth (1 x 1, its
# best settings) in one bench/run.py invocation, on Llama-3.1-8B's shape and config.
# Run from the repository root on the GPU machine with .whl and .bench carried.
# Extra bench/run.py arguments may follow (they override the ones here).
R=$PWD
source bench/device_env.sh
cd /tmp && python3 $R/bench/run.py --model-shape 8b-128k --rows ${ROWS:-200} \
  --cases ${CASES:-qlora-ctx16384@allgc-b80,qlora-ctx32768@allgc-b80} \
  --unsloth ${UNSLOTH:-1x1:qlora-ctx16384,1x1:qlora-ctx32768} \
  --steps ${STEPS:-12} --warmup 2 --timing events --log-every 10 \
  --deadline-s ${DEADLINE:-560} --logs $OUT/logs --out $OUT --label "${LABEL:-issue 16 item 3: long context}" "$@"
rc=$?
# what the trainer's process imports, and for how long (warm file cache, after the cases)
python3 -X importtime -c 'import torch, trl; from transformers import TrainerCallback; import kubetune.trainer.train, kubetune.trainer.dataset' 2> $OUT/importtime.txt
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
exit $rc
