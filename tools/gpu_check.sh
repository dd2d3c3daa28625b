#!/usr/bin/env bash
# What a session with a GPU runs for issue 33 (the training step's MFU), as one command that cannot come back empty:
# each step runs under its own `timeout` and none can stop the next; its exit code and seconds go to status.txt;
# everything lands in one archive, $OUT/gpu_check.tar.gz (default out/gpu_check), packed again after every step,
# holding only files of plain names (letters, digits, '.', '_', '-') of at most MAX_MB each (the others are listed
# in left_out.txt). It claims nothing: read the files. Run it from the repository root:
#
#   tools/gpu_check.sh [BEAUTY_DIR|-] [GGUF ...]
#
# BEAUTY_DIR: reviews_Beauty_5.json.gz and meta_Beauty.json.gz; '-' or nothing: CONFIG's own data (synthetic).
# Speed (sync, finetune_*) runs on a folder of random weights made here from MODEL_CONFIG (SmolLM2-135M's
#   config.json, which travels with the repository): the shapes are SmolLM2's and a step's time does not depend on
#   the values, so it needs no GGUF (model.sid_init=mean: the folder has no tokenizer).
# GGUF (optional): SmolLM2-135M-Instruct.Q4_1.gguf, or its parts in order. The 98 MB file is more than one call
#   carries (64 MiB): `split -b 50M FILE models/gguf/part.` here, one part carried per call (a part carried
#   earlier stays on the machine). gguf_to_hf.py reads the parts as one file with numpy alone (no gguf package)
#   into a bfloat16 folder: the real weights and tokenizer for paper.py's dry run, which is skipped without them.
# Steps and their logs: env, weights, gguf, sync (host synchronisations in a step, CUDA only), finetune_<run> for
#   each of RUNS (bench.py finetune, text rows frozen; the first with a gzipped torch.profiler trace of
#   PROFILE_STEPS steps), paper_dry_run (each run's tokens and seconds at rates measured here).
# Knobs (the defaults are the GPU's; a CPU dry run sets them small: tests/test_tools.py): CONFIG, MODEL_CONFIG,
#   DEPTHS, STEPS, RUNS (space-separated, each bsN: train.batch_size N, or tokensN: train.batch_tokens N),
#   PROFILE_STEPS, EXTRA (key=value for every command), PAPER_ARGS, DEVICE, PYTHON, STEP_S (a step's limit in
#   seconds), PAPER_S (the dry run's), DEADLINE_S (the whole script's: a step gets at most what is left, and is
#   skipped with under 20 s left; keep it under the call's own limit), MAX_MB.
set -uo pipefail   # no -e: a step that fails is recorded, and the next one runs
[ -f bench.py ] || { echo "tools/gpu_check.sh: run it from the repository root" >&2; exit 2; }
BEAUTY=${1:--}; shift $(( $# > 0 ))
OUT=${OUT:-out/gpu_check}
CONFIG=${CONFIG:-configs/beauty_smollm2.yaml}
MODEL_CONFIG=${MODEL_CONFIG:-configs/smollm2-135m.json}
DEPTHS=${DEPTHS:-30}
STEPS=${STEPS:-10}
RUNS=${RUNS:-"bs128 tokens16384 tokens65536"}   # today's batch, then two token budgets (about 2x and 8x its)
PROFILE_STEPS=${PROFILE_STEPS:-1}
PAPER_ARGS=${PAPER_ARGS:-"--seeds 3"}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
EXTRA=${EXTRA:-}
STEP_S=${STEP_S:-150}
PAPER_S=${PAPER_S:-240}
DEADLINE_S=${DEADLINE_S:-450}
MAX_MB=${MAX_MB:-4}
WORK=$(mktemp -d)
RES=$WORK/gpu_check          # what the archive holds
mkdir -p "$OUT" "$RES" && OUT=$(cd "$OUT" && pwd)
trap 'rm -rf "$WORK"' EXIT
COMMON="train.device=$DEVICE train.sid_cache=$WORK/sids $EXTRA"
[ "$BEAUTY" = - ] || COMMON="data.dir=$BEAUTY $COMMON"
SPEED="model.hf_dir=$WORK/random model.sid_init=mean"
: > "$RES/status.txt"

pack() {   # $RES -> $OUT/gpu_check.tar.gz, written whole then renamed: plain names of at most MAX_MB only
  (cd "$WORK" && find gpu_check -type f ! -name left_out.txt | LC_ALL=C sort > members.all
   LC_ALL=C grep -E '^[A-Za-z0-9._/-]+$' members.all | while read -r f; do
     [ "$(stat -c %s "$f")" -le $((MAX_MB * 1048576)) ] && echo "$f"; done > members
   LC_ALL=C comm -23 members.all members > gpu_check/left_out.txt
   echo gpu_check/left_out.txt >> members
   tar -czf "$OUT/gpu_check.tar.gz.part" -T members) &&
  mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
}

step() {   # step NAME LIMIT_S CMD...: CMD under `timeout`, its output in NAME.log, "NAME: exit E in S s" in status.txt
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE_S - SECONDS - 10)) t0=$SECONDS rc
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped, ${left} s left of DEADLINE_S $DEADLINE_S" >> "$RES/status.txt"; pack; return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ", timed out at $limit s")" >> "$RES/status.txt"
  pack
  return $rc
}

# 1. where it runs
step env "$STEP_S" bash -c "$PYTHON -c \"import sys, torch; print(sys.executable, 'torch', torch.__version__,
  'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')\"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || echo 'no nvidia-smi'"

# 2. SmolLM2-135M's shapes, random bfloat16 weights: the speed runs' backbone
step weights "$STEP_S" "$PYTHON" gguf_to_hf.py --random "$MODEL_CONFIG" "$WORK/random" --dtype bfloat16

# 3. the real SmolLM2, bfloat16, from the GGUF's parts (optional)
if [ $# -gt 0 ]; then
  step gguf "$STEP_S" "$PYTHON" gguf_to_hf.py "$@" "$WORK/smollm2" --dtype bfloat16
else
  echo "gguf: skipped, no GGUF given (paper_dry_run needs it)" >> "$RES/status.txt"
fi

# 4. host synchronisations in a training step (CUDA only): every op that waits for the device warns once per call
cat > "$WORK/sync.py" <<'PY'
import collections, sys, warnings
import torch
import backbones, mfu, sweep
if not torch.cuda.is_available():
    sys.exit(print("no CUDA: torch.cuda.set_sync_debug_mode needs a GPU"))
cfg = sweep.run_config(sys.argv[1:])
mfu_args = type("A", (), {"config": sys.argv[1], "steps": 3, "threads": 0, "batch_tokens": 0})()
_, device, tok, batches, _ = mfu.finetune_data(mfu_args, sys.argv[2:])
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
# shellcheck disable=SC2086   # COMMON, SPEED, EXTRA and PAPER_ARGS are lists of words
step sync "$STEP_S" env PYTHONPATH=. "$PYTHON" "$WORK/sync.py" "$CONFIG" $COMMON $SPEED

# 5. the step's speed at each batch size or token budget, text rows frozen; the first run profiled
profile=(--profile "$RES/profile" --profile-steps "$PROFILE_STEPS")
for run in $RUNS; do
  name=finetune_$(printf %s "$run" | tr -c 'A-Za-z0-9._-' _)
  case $run in
    bs[0-9]*) size=(train.batch_size="${run#bs}") ;;
    tokens[0-9]*) size=(--batch-tokens "${run#tokens}") ;;
    *) echo "$name: skipped, RUNS entries are bsN or tokensN" >> "$RES/status.txt"; continue ;;
  esac
  step "$name" "$STEP_S" "$PYTHON" bench.py finetune "$CONFIG" --depths "$DEPTHS" --steps "$STEPS" \
    --settings "text rows frozen" "${size[@]}" "${profile[@]}" $COMMON $SPEED &&
    tail -n 1 "$RES/$name.log" > "$RES/$name.json"
  if [ ${#profile[@]} -gt 0 ] && compgen -G "$RES/profile/*.json" > /dev/null; then
    gzip -qf "$RES"/profile/*.json; profile=(); pack   # ui.perfetto.dev opens it gzipped; the next runs unprofiled
  fi
done

# 6. the paper's pipeline, dry, on the real SmolLM2: every run's tokens and expected seconds at rates measured here
if [ $# -gt 0 ]; then
  step paper_dry_run "$PAPER_S" "$PYTHON" paper.py "$CONFIG" $PAPER_ARGS --dry-run --out "$WORK/paper" $COMMON \
    model.hf_dir="$WORK/smollm2" && tail -n 1 "$RES/paper_dry_run.log" > "$RES/paper_dry_run.json"
else
  echo "paper_dry_run: skipped, no GGUF given" >> "$RES/status.txt"
fi
pack
cat "$RES/status.txt"
echo "done: $OUT/gpu_check.tar.gz ($(tar -tzf "$OUT/gpu_check.tar.gz" | wc -l) files)"
