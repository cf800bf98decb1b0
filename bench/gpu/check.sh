#!/usr/bin/env bash
# One prepared run on a lent GPU host (H100/H200; ~9 minutes): the GPU checks of the samplers
# issue, and training that would take CPU-days here, all writing under $OUT.
#
#   OUT=/tmp/gpu-out bash bench/gpu/check.sh                        # on the GPU host
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash bench/gpu/check.sh     # a dry run of every stage on a CPU
#
# Stages, each under its own time limit (a failing stage leaves the others' results):
#  1. background: the LADD turbo student and its distillation-only baseline (shared teacher
#     data), and shapes-ldm ablations at equal budget (eps; v; v + zero terminal SNR), each
#     stopped by SIGTERM (they checkpoint on it) and shrunk to fp16 EMA weights (training.slim);
#     the SD3-medium-sized stand-in's random weights are written meanwhile (CPU only).
#  2. foreground, meanwhile: the oracle, per-row and seed-compatibility tests on the device in
#     fp32 and bf16 (tests/device.py), measured errors in tests-<precision>.jsonl.
#  3. after training, alone on the device: bench.turbo (teacher vs turbo settings, batch 1 and 8;
#     the stand-in at 512x512).
source bench/gpu/common.sh  # settings (DEVICE, OUT, WORK, QUICK, PY), wheels, env.txt, stamp
TRAIN_S=${TRAIN_S:-330}     # wall-clock for the trainers, synthesis and banks included
cp "$OUT/env.txt" "$WORK/env.txt"

if [ -n "$QUICK" ]; then
  LADD="--data 16 --chunk 8 --batch 8 --sizes 64x64 96x64"; LDM="--bank 256 --batch 8 --width 32"; TESTS="-k euler"
  BENCH="--quick --repeats 1"
else
  LADD="--data 4096 --chunk 512 --batch 64 --sizes 64x64 64x96 64x128 96x64 96x96 96x128 128x64 128x96 128x128"
  LDM="--bank 120000 --batch 256 --width 64"; TESTS=""; BENCH="--repeats 5 --stand-in-batches 1 8"
fi
AMP=$([ "$DEVICE" = cpu ] && echo "" || echo "--amp")

# 1. training, in the background
train() {  # name, module, args...
  local name=$1; shift
  timeout -s TERM -k 60 "$TRAIN_S" $PY -m "$@" --device "$DEVICE" $AMP --out "$WORK/$name" --minutes 60 --threads 2 \
    > "$WORK/$name.log" 2>&1
  echo "exit $?" >> "$WORK/$name.log"
  $PY -m training.slim "$WORK/$name/checkpoint.pt" "$OUT/$name.pt" >> "$WORK/$name.log" 2>&1
}
stamp "training starts"
train turbo training.train_ladd --teacher models/shapes-mmdit $LADD &
train turbo-distill training.train_ladd --teacher models/shapes-mmdit $LADD --adv-weight 0 \
  --data-from "$WORK/turbo/synthetic.pt" &
train ldm-eps training.train_ldm $LDM --prediction epsilon &
train ldm-v training.train_ldm $LDM --prediction v_prediction &
train ldm-vz training.train_ldm $LDM --prediction v_prediction --zero-snr &
(timeout 300 $PY -m bench.turbo --build-only --out "$WORK/build" --work "$WORK/bench" $BENCH > "$WORK/build.log" 2>&1) &
build=$!

# 2. tests on the device, meanwhile
for precision in fp32 bf16; do
  stamp "tests $precision"
  LATENTSERVE_TEST_DEVICE=$DEVICE LATENTSERVE_TEST_PRECISION=$precision \
  LATENTSERVE_TEST_REPORT="$WORK/tests-$precision.jsonl" \
    timeout 160 $PY -m pytest -q --noconftest -p no:cacheprovider tests/test_samplers.py tests/test_seed_compat.py \
      $TESTS > "$WORK/tests-$precision.txt" 2>&1
  echo "exit $?" >> "$WORK/tests-$precision.txt"
  tail -4 "$WORK/tests-$precision.txt"
done

stamp "waiting for the trainers"
wait
stamp "bench"
timeout 180 $PY -m bench.turbo --device "$DEVICE" --out "$WORK/bench-report" --work "$WORK/bench" $BENCH \
  > "$WORK/bench.log" 2>&1
echo "exit $?" >> "$WORK/bench.log"
cp "$WORK/bench-report/report.json" "$WORK/bench-turbo.json" 2>/dev/null
stamp "done"
# At most 8 files come back: the five fp16 checkpoints and one archive of everything else.
cd "$WORK" || exit 1
for d in turbo turbo-distill ldm-eps ldm-v ldm-vz; do cp "$d/log.jsonl" "$d.jsonl" 2>/dev/null; done
tar czf "$OUT/report.tgz" env.txt ./*.log ./*.jsonl ./tests-*.txt bench-turbo.json 2>/dev/null
for f in ./*.log; do echo "== $f"; grep -v "^{" "$f" | tail -n 3; grep "^{" "$f" | tail -n 1; done
tail -n 2 tests-*.txt
grep -h speedup -A0 bench-turbo.json 2>/dev/null
ls -la "$OUT"
