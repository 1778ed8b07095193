#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one run on a CUDA machine, each part's output written as it finishes:
#
#   benchmarks/gpu_check.sh DATA TOKENIZER OUT
#
# DATA: a raw corpus (`distil-codegpt corpus --format raw`); TOKENIZER: a tokenizer directory (the real teacher's
# will do: its files without the weights). Models are random-initialised at the real shapes, so nothing large has
# to reach the machine: speed and memory do not depend on the weights.
#   1. one KD optimizer step, naive against ours, codegpt-small (12 -> 6 layers, 50,257 tokens) at 16 x 1024
#   2. the one-hour recipe's stages at the real teacher's shape (SmolLM2-135M, 30 blocks) cut to the width row
#      (6 of 9 heads, MLPs of 384): importance scoring, the local stage, global KD, evaluation, all on CUDA
#   3. part 1's frozen and clm modes again under torch.compile
set -euo pipefail
DATA=${1:?DATA}
TOK=${2:?TOKENIZER}
OUT=${3:?OUT}
PY=${PYTHON:-python3}
CLI=("$PY" -m distil_codegpt.cli)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== 1. KD step throughput, codegpt-small at 16 x 1024"
"$PY" benchmarks/distil_throughput.py --preset codegpt-small --teacher-layers 12 --student-layers 6 --device cuda \
    --batch-size 16 --seq-len 1024 --vocab 50257 --data "$DATA" --tokenizer "$TOK" --modes naive frozen in-training clm \
    2>&1 | tee "$OUT/kd_step.txt"

echo "== 2. the recipe's stages at SmolLM2-135M's shape (random weights)"
W="$OUT/recipe"
mkdir -p "$W"
"$PY" - "$TOK" "$W/teacher" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.model.presets import preset_config
tok, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(preset_config("smollm2-135m", len(load_tokenizer(tok)))).save_pretrained(out)
for f in Path(tok).iterdir():
    if f.is_file():
        shutil.copy(f, out / f.name)
EOF
loop=(--data "$DATA" --device cuda --seq-len 1024 --batch-size 32 --schedule cosine --warmup-steps 5 --eval-every 0
      --eval-batches 4 --save-every 0 --temperature 1 --alpha-ce 1 --alpha-clm 0 --alpha-cos 0)
"${CLI[@]}" student --teacher "$W/teacher" --data "$DATA" --out "$W/cut" --layers 30 --heads 6 --ffn 384 2>&1 \
    | tail -4 | tee "$OUT/recipe.txt"
"${CLI[@]}" distil --stage local --student "$W/cut" --teacher "$W/teacher" --out "$W/local" --max-steps 40 \
    "${loop[@]}" 2>&1 | tail -3 | tee -a "$OUT/recipe.txt"
"${CLI[@]}" distil --student "$W/local" --teacher "$W/teacher" --out "$W/kd" --max-steps 40 "${loop[@]}" 2>&1 \
    | tail -3 | tee -a "$OUT/recipe.txt"
"${CLI[@]}" evaluate --model "$W/kd" --test "$DATA/line_completion/test.json" --limit 100 --context 1024 \
    --max-new-tokens 48 --batch-size 32 --device cuda --out "$W/eval" 2>&1 | tail -4 | tee -a "$OUT/recipe.txt"
"$PY" - "$W" <<'EOF' | tee "$OUT/recipe.json"
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
keep = ("steps", "tokens", "seconds", "train_seconds", "tokens_per_s", "precision", "device", "compute_share", "params")
rows = {}
for step in ("cut", "local", "kd", "eval"):
    m = json.loads((w / step / "run.json").read_text()).get("metrics", {})
    rows[step] = {k: m[k] for k in keep if k in m}
    if step in ("local", "kd") and m.get("train_seconds"):
        rows[step]["kd_tokens_per_s"] = round(m["tokens"] / m["train_seconds"], 1)
print(json.dumps(rows, indent=1))
EOF

echo "== 3. part 1 under torch.compile"
"$PY" benchmarks/distil_throughput.py --preset codegpt-small --teacher-layers 12 --student-layers 6 --device cuda \
    --batch-size 16 --seq-len 1024 --vocab 50257 --data "$DATA" --tokenizer "$TOK" --modes frozen clm --compile \
    2>&1 | tee "$OUT/kd_step_compile.txt"
