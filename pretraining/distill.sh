#!/bin/sh
# The MiniRBT recipe, two stages (MiniRBT's settings as defaults; every one overridable):
#   stage 1: teacher (RoBERTa-wwm-ext) -> RBT6 teacher assistant, initialised from the teacher's layers
#   stage 2: RBT6 -> MiniRBT-H256 and RBT6 -> MiniRBT-H288
# Run as `sh pretraining/distill.sh` from the repository root or `sh distill.sh` from pretraining/.
#   TEACHER=... DATASET=... OUT=... NPROC=8 sh pretraining/distill.sh
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

TEACHER=${TEACHER:-$ROOT/pretrained_model_path/RoBERTa-wwm-ext}
DATASET=${DATASET:-$ROOT/dataset/cached}
OUT=${OUT:-$ROOT/outputs}
NPROC=${NPROC:-1}                 # GPUs on this node (torchrun --nproc_per_node)
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-4096}  # MiniRBT: 4096 sequences per step
STEPS=${STEPS:-100000}
LR=${LR:-4e-4}
TEMPERATURE=${TEMPERATURE:-8}
LAYER_MAP=${LAYER_MAP:-uniform}
SAVE_STEPS=${SAVE_STEPS:-1000}
EVAL_STEPS=${EVAL_STEPS:-1000}
BF16=${BF16:---bf16}             # set BF16= to train in fp32
EXTRA=${EXTRA:-}                  # more train.py flags, e.g. "--mlm_weight 1"
OVERWRITE=${OVERWRITE:-}          # OVERWRITE=1: replace earlier outputs made with other settings
PYTHON=${PYTHON:-python}
# Each stage's script decides whether its output is done (same settings and inputs: skipped), unfinished
# (resumed), or made with other settings (refused, listing them; OVERWRITE=1 replaces it): see minirbt/stages.py.
OVERWRITE_FLAG=
[ -z "$OVERWRITE" ] || OVERWRITE_FLAG=--overwrite_output

if [ ! -f "$TEACHER/config.json" ]; then
  echo "error: no teacher at $TEACHER" >&2
  echo "  put the RoBERTa-wwm-ext folder there (config.json, model.safetensors or pytorch_model.bin, vocab.txt)," >&2
  echo "  or set TEACHER=/path/to/folder; see pretrained_model_path/README.md" >&2
  exit 2
fi
if [ ! -d "$DATASET" ]; then
  echo "error: no dataset at $DATASET: build it with pretraining/run_chinese_ref.py and pretraining/my_datasets.py," >&2
  echo "  or set DATASET=/path/to/folder" >&2
  exit 2
fi
ACCUM=$((GLOBAL_BATCH / (PER_DEVICE_BATCH * NPROC)))
[ "$ACCUM" -ge 1 ] || ACCUM=1
echo "global batch $((PER_DEVICE_BATCH * NPROC * ACCUM)) = $PER_DEVICE_BATCH x $NPROC GPUs x $ACCUM accumulation"

if [ "$NPROC" -gt 1 ]; then
  LAUNCH="torchrun --nproc_per_node $NPROC"
else
  LAUNCH="$PYTHON"
fi

distill() {  # teacher student_flag student output matches
  # --resume: an interrupted stage continues from its newest checkpoint; a finished one is skipped by train.py
  # shellcheck disable=SC2086
  $LAUNCH "$ROOT/pretraining/train.py" --teacher "$1" "$2" "$3" --dataset "$DATASET" --output_dir "$4" \
    --matches "$5" --temperature "$TEMPERATURE" --learning_rate "$LR" --max_steps "$STEPS" \
    --batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$ACCUM" \
    --save_steps "$SAVE_STEPS" --eval_steps "$EVAL_STEPS" --resume $OVERWRITE_FLAG $BF16 $EXTRA
}

echo "== stage 1: $TEACHER -> RBT6 (teacher assistant)"
# shellcheck disable=SC2086
$PYTHON "$ROOT/scripts/init_checkpoint_TA.py" --teacher "$TEACHER" --student_config rbt6 \
  --layer_map "$LAYER_MAP" --output "$OUT/rbt6_init" $OVERWRITE_FLAG
distill "$TEACHER" --student_init "$OUT/rbt6_init" "$OUT/rbt6" L12_L6_hidden_mse

echo "== stage 2: RBT6 -> MiniRBT-H256"
distill "$OUT/rbt6" --student_config minirbt_h256 "$OUT/minirbt_h256" L6_L6_hidden_mse_H256
echo "== stage 2: RBT6 -> MiniRBT-H288"
distill "$OUT/rbt6" --student_config minirbt_h288 "$OUT/minirbt_h288" L6_L6_hidden_mse_H288
echo "done: $OUT/rbt6, $OUT/minirbt_h256, $OUT/minirbt_h288"
