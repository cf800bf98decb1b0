#!/usr/bin/env bash
# Training on a lent GPU host, right after bench/gpu/loadtest.sh on the same warm machine (its
# bank is reused): shapes-ldm continued from the shipped weights at a lower learning rate
# (its held-out pairs are short of the target), and shapes-inpaint fine-tuned from shapes-ldm;
# side by side, each stopped by SIGTERM (they checkpoint on it), weights back as fp16 EMA.
#
#   OUT=/tmp/gpu-out bash bench/gpu/train.sh                        # on the GPU host (~5 min)
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash bench/gpu/train.sh     # a dry run on a CPU
source bench/gpu/common.sh  # settings (DEVICE, OUT, WORK, QUICK, PY), wheels, env.txt, stamp
TRAIN_S=${TRAIN_S:-240}
if [ -n "$QUICK" ]; then BANK="--bank 256 --batch 8 --width 64"; else BANK="--bank 120000 --batch 256 --width 64"; fi
AMP=$([ "$DEVICE" = cpu ] && echo "" || echo "--amp")

train() {  # name, module, args...
  local name=$1; shift
  timeout -s TERM -k 60 "$TRAIN_S" $PY -m "$@" $BANK --device "$DEVICE" $AMP --out "$WORK/$name" --minutes 60 \
    --threads 2 --init-model models/shapes-ldm > "$WORK/$name.log" 2>&1
  echo "exit $?" >> "$WORK/$name.log"
  $PY -m training.slim "$WORK/$name/checkpoint.pt" "$OUT/$name.pt" >> "$WORK/$name.log" 2>&1
  tail -4 "$WORK/$name.log" > "$OUT/$name.log"
}
stamp "training"
train ldm training.train_ldm --prediction v_prediction --lr 1e-4 &
train inpaint training.train_inpaint --lr 1e-4 &
wait
cat "$OUT"/ldm.log "$OUT"/inpaint.log
ls -la "$OUT"
stamp "done"
