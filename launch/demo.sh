#!/usr/bin/env bash
# The demo, end to end on a CPU (about 6 minutes on 2 cores once .venv exists):
#   1. set up .venv (launch/setup_env.sh);
#   2. build the demo dataset (digits, photos and moving-digit videos from data shipped in scikit-learn and
#      scikit-image; a few MB, deterministic);
#   3. train stage 1 (symmetric InfoNCE) of the `tiny` preset from random weights, evaluating before and after;
#   4. train stage 2 (MAMCL, instruction-style queries) from stage 1's final model;
#   5. evaluate the result on the held-out eval files and export it to Hugging Face format.
# Everything lands in DIR (default demo_out). Rerunning resumes or skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
bash launch/setup_env.sh
PY=.venv/bin/python
export PYTHONUNBUFFERED=1

$PY launch/make_demo_data.py --out="$OUT/data"
DATA="$OUT/data"
EVAL="$DATA/eval"

echo "== stage 1: retrieval adaptation (tiny preset, random init)"
$PY launch/train.py --config=configs/stage1.py:tiny --workdir="$OUT/stage1" \
  --config.data.train="$DATA/stage1_images.json,$DATA/stage1_videos.jsonl@0.5,$DATA/stage1_text.json" \
  --config.eval.files="$EVAL" --config.eval.at_start=True

echo "== stage 2: instruction tuning (from stage 1)"
$PY launch/train.py --config=configs/stage2.py:tiny --workdir="$OUT/stage2" --config.model.init="$OUT/stage1" \
  --config.data.train="$DATA/stage2.jsonl,$DATA/stage2_mmeb.jsonl,$DATA/stage1_images.json@0.5"

echo "== evaluation of the final model on held-out data"
TASKS="t2i_digits i2t_digits i2t_photos t2v_motion mmeb_digit_cls mmeb_motion_dir"
for task in $TASKS; do
  $PY launch/eval.py --model="$OUT/stage2" --queries="$EVAL/$task/queries.jsonl" \
    --candidates="$EVAL/$task/candidates.jsonl" --output="$OUT/eval_$task.json"
done
# recall@1 of the random init (stage 1's first evaluation), of the final model, and of a random ranking
$PY - "$OUT" $TASKS <<'PY'
import json, sys
out, tasks = sys.argv[1], sys.argv[2:]
chance = json.load(open(f"{out}/data/manifest_summary.json"))["chance_top1"]
first = next(json.loads(line) for line in open(f"{out}/stage1/metrics.jsonl") if '"eval/' in line)
print(f"{'task':18s} {'random init':>12s} {'trained':>9s} {'chance':>8s}   (recall@1 on held-out data)")
for task in tasks:
    final = json.load(open(f"{out}/eval_{task}.json"))["recall@1"]
    print(f"{task:18s} {first[f'eval/{task}/recall@1']:12.3f} {final:9.3f} {chance[task]:8.3f}")
PY

echo "== export to Hugging Face format"
$PY launch/convert.py --src="$OUT/stage2" --dst="$OUT/hf" --overwrite
echo "demo done: final model $OUT/stage2/model, Hugging Face export $OUT/hf, metrics in $OUT/stage*/metrics.jsonl"
