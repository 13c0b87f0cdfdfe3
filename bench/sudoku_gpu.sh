#!/usr/bin/env bash
# bench/sudoku_gpu.sh [OUT] — the Sudoku GPU session of RESULTS.md in one command (one H100/H200, ~9 min):
#   1. compiled training speed of relay and mlm, as step 2 trains (bench/throughput.py, with a
#      profile of relay: kernel time against step time; ~1 min);
#   2. Table 1 at equal steps: the four objectives, paper preset, compiled, on the tiered data
#      (generated puzzles cached in data/: make them first on a CPU and carry data/ along, e.g.
#      `python bench/sudoku_data.py --n-train 40000 --n-test 2000 --speed 0 --speed-hard 0`, ~40 min
#      on 2 cores, then N_TRAIN=40000: the paper preset's set; RESULTS.md), relay first;
#      a time budget stops the comparison (Ctrl-C's signal: the run in training saves a checkpoint at its
#      step, which the same command resumes) and whatever finished is reported;
#   3. the relay run's EMA weights in fp16 (replace checkpoints/sudoku_relay_hard.pt only if they beat it on
#      checkpoints/sudoku_test_public.csv: the shipped file is fine-tuned on public hard puzzles, RESULTS.md).
# Env: STEPS (5000), BUDGET (seconds for step 2, 450), N_TRAIN (12000), N_TEST (2000),
#      EXTRA (flags for every run; a tiny model and --device cpu try this on a CPU), SPEED (1; 0 skips step 1 and
#      gives its minute to step 2, whose runs report their own steady rows/s: SPEED=0 BUDGET=530 lets all
#      four objectives finish in one 10-minute device call at about 22,000 rows/s).
# Public hard puzzles instead of generated ones (RESULTS.md, "Public hard puzzles"): make data/public with
# bench/sudoku_public.py on a CPU, carry data/, and pass
#      EXTRA="--data data/public/train.csv --test-data data/public/test.csv" (about 15 MB).
# To fine-tune the shipped checkpoint on them instead: bash bench/sudoku_gpu_public.sh.
set -uo pipefail
OUT=${1:-out/gpu}
STEPS=${STEPS:-5000}; BUDGET=${BUDGET:-450}; N_TRAIN=${N_TRAIN:-12000}; N_TEST=${N_TEST:-2000}; EXTRA=${EXTRA:-}
mkdir -p "$OUT"
STAMP="$OUT/.started"; touch "$STAMP"  # a relay checkpoint older than this is an earlier run's
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # no progress bars in the log (the runs print their own lines)
log() { tee -a "$OUT/log.txt"; }
for f in $(echo "$EXTRA" | grep -oE -- '--(test-)?data [^ ]+' | cut -d' ' -f2); do  # before a minute of GPU time
    [ -f "$f" ] || { echo "no $f (named in EXTRA): make it on a CPU and carry it along" | log; exit 1; }
done
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && ! [[ "$EXTRA" =~ --device[=\ ]cpu ]]; then
    echo "no CUDA GPU: this is the GPU session's script (hours on a CPU); EXTRA=\"--device cpu ...\" tries it on one" | log
    exit 1
fi
{ date -u; git rev-parse --short HEAD; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__)"; } 2>&1 | log

# 1) compiled speed, and where relay's step spends its time
if [ "${SPEED:-1}" != 0 ]; then
    python bench/throughput.py --preset paper --compile --objectives relay mlm --steps 50 --n-gen 64 --profile $EXTRA 2>&1 \
        | log | grep '^{' | tail -n 1 > "$OUT/throughput_compiled.json"
fi

# 2) the four objectives at equal steps, compiled, relay first; each saves its result as it ends, in a folder
#    named by the flags (the same command goes on where it stopped; other flags never meet its runs)
FLAGS="--preset paper --compile --max-steps $STEPS --n-train $N_TRAIN --eval-size $N_TEST --eval-every $STEPS \
       --ckpt-every $STEPS $EXTRA"
CMP="out/compare_$(printf '%s' "$FLAGS" | cksum | cut -d' ' -f1)"
echo "runs in $CMP" | log
timeout -k 60 -s INT "$BUDGET" python bench/compare_objectives.py --out-dir "$CMP" --objectives relay mlm relay_sg rollout \
    $FLAGS 2>&1 | log
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then  # 124 (137: killed 60 s later): the budget, expected
    echo "step 2 failed (exit $rc, see above): reporting what finished" | log
fi
# report what finished with these flags (saved results of other flags are left out)
python bench/compare_objectives.py --out-dir "$CMP" --objectives $FLAGS 2>&1 | log \
    | grep '^{' | tail -n 1 > "$OUT/compare.json"
cp "$CMP/curves.png" "$OUT/" 2>/dev/null

# 3) the relay run's EMA weights (fp16), finished or not: a finished one with these flags, or one this run wrote
if grep -q '"relay"' "$OUT/compare.json" || [ "$CMP/relay/ckpt.pt" -nt "$STAMP" ]; then
    python train_sudoku.py --export "$OUT/sudoku_relay_hard.pt" --overwrite --checkpoint "$CMP/relay/ckpt.pt" 2>&1 | log
else
    echo "no relay checkpoint from this run or with these flags: nothing exported" | log
fi
ls -la "$OUT" | log
