#!/bin/sh
# The recipe-fidelity measurements of the README (#13): on a finished default demo run, stage 1 again with the
# teacher assistant's MLM head left random (MiniRBT's released init), and stages 1 + 2 (H256) with PyTorch's
# bias-corrected AdamW instead of MiniRBT's; then dev masked-token accuracy of each next to the demo's own runs.
#   python scripts/demo.py && sh bench/fidelity.sh [DEMO_DIR] [OUT_DIR]
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${1:-$ROOT/outputs/demo}
M=${2:-$ROOT/outputs/fidelity}
PY=${PYTHON:-python}
[ -f "$D/results.json" ] || { echo "error: no finished demo run in $D (run python scripts/demo.py first)" >&2; exit 2; }
MATCH_TA=$($PY -c "import json; print(json.dumps(json.load(open('$D/models/ta/minirbt_training.json'))['matches']))")
MATCH_H256=$($PY -c "import json; print(json.dumps(json.load(open('$D/models/two_stage_H256/minirbt_training.json'))['matches']))")
T=$($PY -c "import json; print(json.load(open('$D/models/ta/minirbt_training.json'))['args']['temperature'])")
common="--dataset $D/dataset_jieba_64 --max_steps 500 --batch_size 16 --gradient_accumulation_steps 1 --learning_rate 0.001 --warmup_ratio 0.1 --eval_steps 100 --eval_batches 20 --save_steps 100 --save_total_limit 1 --logging_steps 20 --temperature $T --resume"
TORCH_ADAMW="--adam_bias_correction --adam_epsilon 1e-8"
$PY "$ROOT/scripts/init_checkpoint_TA.py" --teacher "$D/models/teacher" --student_config "$D/configs/ta.json" \
  --layer_map uniform --mlm_head random --output "$M/ta_init_random"
# shellcheck disable=SC2086
$PY "$ROOT/pretraining/train.py" $common --output_dir "$M/ta_head_random" --student_init "$M/ta_init_random" \
  --teacher "$D/models/teacher" --matches "$MATCH_TA"
# shellcheck disable=SC2086
$PY "$ROOT/pretraining/train.py" $common --output_dir "$M/ta_torch_adamw" --student_init "$D/models/ta_init" \
  --teacher "$D/models/teacher" --matches "$MATCH_TA" $TORCH_ADAMW
# shellcheck disable=SC2086
$PY "$ROOT/pretraining/train.py" $common --output_dir "$M/h256_torch_adamw" \
  --student_config "$D/configs/student_H256.json" --teacher "$M/ta_torch_adamw" --matches "$MATCH_H256" $TORCH_ADAMW
$PY - "$D/models" "$M" <<'PY'
import json
import sys
from pathlib import Path

demo, meas = Path(sys.argv[1]), Path(sys.argv[2])
runs = {"stage 1, head copied, MiniRBT's AdamW (default)": demo / "ta",
        "stage 1, head random, MiniRBT's AdamW": meas / "ta_head_random",
        "stage 1, head copied, PyTorch's AdamW": meas / "ta_torch_adamw",
        "stage 2 H256, MiniRBT's AdamW (default)": demo / "two_stage_H256",
        "stage 2 H256, PyTorch's AdamW (from its TA)": meas / "h256_torch_adamw"}
for name, folder in runs.items():
    s = json.loads((folder / "minirbt_training.json").read_text())
    start, end = s["dev_start"], s["dev"]
    print(f"{name}: dev masked-token accuracy {100 * start['student_mlm_accuracy']:.2f}% -> "
          f"{100 * end['student_mlm_accuracy']:.2f}% (loss {end['student_mlm_loss']:.3f}, "
          f"agreement {100 * end['top1_agreement']:.1f}%)")
PY
