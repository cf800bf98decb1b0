#!/usr/bin/env bash
# One prepared run on a lent GPU host for the superres/video issue (~9 minutes):
#  1. side by side on the device: shapes-x4 continued from the CPU run's weights (carried in
#     .gpu/x4-init/unet) on a larger bank and batch, and shapes-video's motion adapter from
#     scratch on 16-frame clips; each stopped by SIGTERM (they checkpoint on it) and shrunk to
#     fp16 EMA weights (training.slim) that come back in $OUT and export here;
#  2. alone on the device: x4 (64 -> 256) and 16-frame txt2video timed through the serving
#     engines on CUDA, then on the host's CPU (bench.gpu.tasks_timing, models exported there).
#
#   OUT=/tmp/gpu-out bash bench/gpu/issue11.sh                      # on the GPU host
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash bench/gpu/issue11.sh   # a dry run of every stage on a CPU
source bench/gpu/common.sh  # settings (DEVICE, OUT, WORK, QUICK, PY), wheels, env.txt, stamp
TRAIN_S=${TRAIN_S:-360}     # wall-clock for both trainers, banks included
TIMING_S=${TIMING_S:-150}
if [ -n "$QUICK" ]; then
  TRAIN_S=40
  X4="--bank 64 --batch 4"; VIDEO="--bank 16 --batch 2 --frames 4"; TIMING="--repeats 1 --cpu-repeats 1 --x4-steps 2 --video-steps 2 --frames 4"
else
  X4="--bank 12000 --batch 256 --lr 3e-4"; VIDEO="--bank 8000 --batch 32 --frames 16 --lr 2e-4"; TIMING="--repeats 5 --cpu-repeats 2"
fi
AMP=$([ "$DEVICE" = cpu ] && echo "" || echo "--amp")

train() {  # name, slim's --keep, module, args...
  local name=$1 keep=$2; shift 2
  timeout -s TERM -k 60 "$TRAIN_S" $PY -m "$@" --device "$DEVICE" $AMP --out "$WORK/$name" --minutes 60 --threads 4 \
    > "$WORK/$name.log" 2>&1
  echo "exit $?" >> "$WORK/$name.log"
  $PY -m training.slim "$WORK/$name/checkpoint.pt" "$OUT/$name.pt" $keep >> "$WORK/$name.log" 2>&1
  grep -v "^\[transformers\]" "$WORK/$name.log" | tail -40 > "$OUT/$name.log"
}
stamp "training starts"
train x4 "" training.train_x4 --init-model .gpu/x4-init $X4 &
train video "--keep motion_modules added" training.train_video $VIDEO &
wait
stamp "training done"
ls -la "$OUT"

# 2. timing, alone on the device: the models as they export (weights do not change the time)
$PY -m training.train_x4 --out "$WORK/x4" --export "$WORK/export/x4" > "$WORK/export.log" 2>&1
$PY -m training.train_video --out "$WORK/video" --export "$WORK/export/video" >> "$WORK/export.log" 2>&1 \
  || tail -20 "$WORK/export.log"
DEVICES=$([ "$DEVICE" = cpu ] && echo "cpu" || echo "cuda cpu")
timeout -s KILL "$TIMING_S" $PY -m bench.gpu.tasks_timing --x4 "$WORK/export/x4" --video "$WORK/export/video" \
  --devices $DEVICES $TIMING --out "$OUT/tasks_timing.json" 2>&1 | grep -v "^\[transformers\]\|it/s\]"
stamp "done"
ls -la "$OUT"
