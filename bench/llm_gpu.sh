#!/usr/bin/env bash
# bench/llm_gpu.sh [OUT] — the LLM GPU checks in one command (one H100/H200; its time limits allow 12.3 min, over
#   one 10-minute device call: set DEC_S, COMP_S, MEM_S to fit what is left, each > 0 (0 is no limit); a
#   step cut off writes no JSON, the log keeps its lines. Guess, not measured: step 1 ~2.5 min with
#   PROMPTS=1 LENGTHS="64 1024", step 1b ~2-3 min (compiling a 28-layer forward), step 2 ~1 min):
#   1. block decoding of a 1.5B-shaped random model, batch 1 and 8/32: static cache + CUDA graphs,
#      the static cache without graphs (graphs == static_eager: the graphs replay right), dynamic
#      cache and uncached, ms per forward, tok/s and whether the tokens match, and a profile
#      of one static decode: kernel against wall time per forward (sampler.py --bench --bench-profile);
#   1b. the same at the last length with the block forward torch.compile'd before capture (fused
#      kernels; --bench-modes compiled uncached), in a process of its own: a failure keeps step 1;
#   2. peak memory and step time of SFT against Relay K = 2 at seq 2048, batch 2, gradient
#      checkpointing (bench/train_memory.py), the target being Relay <= 0.90x SFT.
# Each step has its own time limit and writes its JSON line to OUT; a step that fails does not stop
# the next. Env: SHAPE (1.5b; tiny tries the script on a CPU), LENGTHS (64 256 1024), SEQ (2048),
#      PROMPTS (3: batch-1 prompts), DEC_S, COMP_S and MEM_S (seconds for steps 1, 1b and 2: 300, 240, 200).
set -uo pipefail
OUT=${1:-out/llm_gpu}
SHAPE=${SHAPE:-1.5b}; LENGTHS=${LENGTHS:-64 256 1024}; SEQ=${SEQ:-2048}; PROMPTS=${PROMPTS:-3}; DEC_S=${DEC_S:-300}
COMP_S=${COMP_S:-240}; MEM_S=${MEM_S:-200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # no progress bars in the log (the runs print their own lines)
log() { tee -a "$OUT/log.txt"; }
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && [ "$SHAPE" != tiny ]; then
    echo "no CUDA GPU: a $SHAPE model would take hours here; SHAPE=tiny tries the script on a CPU" | log
    exit 1
fi
{ date -u; git rev-parse --short HEAD; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__)"; } 2>&1 | log

# 1) decoding speed: static (graphs on CUDA) vs cached vs uncached, the same tokens
timeout "$DEC_S" python sampler.py --random-init "$SHAPE" --bench --bench-lengths $LENGTHS --bench-prompts "$PROMPTS" \
    --bench-modes static static_eager cached uncached --bench-profile 2>&1 | log \
    | grep '^{' | tail -n 1 > "$OUT/decode.json"
[ -s "$OUT/decode.json" ] || echo "decode: no JSON line (failed or timed out)" | log

# 1b) the compiled block forward (its compilation, a minute or two, falls in the untimed warm-up)
timeout "$COMP_S" python sampler.py --random-init "$SHAPE" --bench --bench-lengths ${LENGTHS##* } --bench-prompts 1 \
    --bench-modes compiled uncached --bench-profile 2>&1 | log \
    | grep '^{' | tail -n 1 > "$OUT/decode_compiled.json"
[ -s "$OUT/decode_compiled.json" ] || echo "compiled: no JSON line (failed or timed out)" | log

# 2) training memory: SFT vs Relay K = 2, gradient checkpointing
timeout "$MEM_S" python bench/train_memory.py --shape "$SHAPE" --batch 2 --seq-len "$SEQ" --grad-ckpt 2>&1 | log \
    | grep '^{' | tail -n 1 > "$OUT/memory.json"
[ -s "$OUT/memory.json" ] || echo "memory: no JSON line (failed or timed out)" | log
ls -la "$OUT" | log
