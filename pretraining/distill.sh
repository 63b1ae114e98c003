#!/bin/sh
# The MiniRBT recipe, two stages (MiniRBT's settings as defaults; every one overridable):
#   stage 1: teacher (RoBERTa-wwm-ext) -> RBT6 teacher assistant, initialised from the teacher's layers
#   stage 2: RBT6 -> MiniRBT-H256 and RBT6 -> MiniRBT-H288
# Run as `sh pretraining/distill.sh` from the repository root or `sh distill.sh` from pretraining/.
#   TEACHER=... DATASET=... OUT=... NPROC=8 sh pretraining/distill.sh                  # one node, 8 GPUs
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 sh pretraining/distill.sh  # on each node
#   DRY_RUN=1 ... sh pretraining/distill.sh        # print the exact commands, run nothing
# On several nodes, OUT, DATASET and the teacher must be on a filesystem every node sees: node 0 builds the
# teacher assistant, the others wait for it; checkpoints are written by global rank 0 and read by every rank.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

TEACHER=${TEACHER:-$ROOT/pretrained_model_path/RoBERTa-wwm-ext}  # a folder, or a model id such as hfl/chinese-roberta-wwm-ext
DATASET=${DATASET:-$ROOT/dataset/cached}
OUT=${OUT:-$ROOT/outputs}
NPROC=${NPROC:-1}                 # GPUs per node (torchrun --nproc_per_node)
NNODES=${NNODES:-1}               # nodes (torchrun --nnodes)
NODE_RANK=${NODE_RANK:-0}         # this node's rank, 0..NNODES-1
MASTER_ADDR=${MASTER_ADDR:-}      # several nodes: the address of node 0 ...
MASTER_PORT=${MASTER_PORT:-29500} # ... and a free port on it
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-4096}  # MiniRBT's README: 4096 sequences per step (its released distill.sh: 2048)
STEPS=${STEPS:-100000}
LR=${LR:-4e-4}
TEMPERATURE=${TEMPERATURE:-8}
LAYER_MAP=${LAYER_MAP:-uniform}
SAVE_STEPS=${SAVE_STEPS:-1000}
EVAL_STEPS=${EVAL_STEPS:-1000}
BF16=${BF16:---bf16}             # set BF16= to train in fp32
EXTRA=${EXTRA:-}                  # more train.py flags, e.g. "--mlm_weight 1"
OVERWRITE=${OVERWRITE:-}          # OVERWRITE=1: replace earlier outputs made with other settings
DRY_RUN=${DRY_RUN:-}              # DRY_RUN=1: print the commands only
WAIT_SECONDS=${WAIT_SECONDS:-86400}  # nodes > 0: how long to wait for node 0's teacher assistant
PYTHON=${PYTHON:-python}
# Each stage's script decides whether its output is done (same settings and inputs: skipped), unfinished
# (resumed), or made with other settings (refused, listing them; OVERWRITE=1 replaces it): see minirbt/stages.py.
OVERWRITE_FLAG=
[ -z "$OVERWRITE" ] || OVERWRITE_FLAG=--overwrite_output

fail() { echo "error: $*" >&2; exit 2; }

case "$TEACHER" in
  /*|.*|*/*/*) IS_ID= ;;  # a path
  */*) IS_ID=1 ;;         # org/name: a folder if it exists here, else a Hugging Face model id
  *) IS_ID= ;;
esac
if [ ! -f "$TEACHER/config.json" ] && [ -z "$IS_ID" ]; then
  echo "error: no teacher at $TEACHER" >&2
  echo "  put the RoBERTa-wwm-ext folder there (config.json, model.safetensors or pytorch_model.bin, vocab.txt)," >&2
  echo "  or set TEACHER=/path/to/folder or a model id (hfl/chinese-roberta-wwm-ext); see pretrained_model_path/README.md" >&2
  exit 2
fi
if [ ! -d "$DATASET" ]; then
  echo "error: no dataset at $DATASET: build it with pretraining/run_chinese_ref.py and pretraining/my_datasets.py," >&2
  echo "  or set DATASET=/path/to/folder" >&2
  exit 2
fi
for v in NPROC NNODES PER_DEVICE_BATCH GLOBAL_BATCH STEPS; do
  eval "x=\$$v"
  case "$x" in ''|*[!0-9]*|0) fail "$v must be a positive integer, got '$x'" ;; esac
done
case "$NODE_RANK" in ''|*[!0-9]*) fail "NODE_RANK must be 0..$((NNODES - 1)), got '$NODE_RANK'" ;; esac
[ "$NODE_RANK" -lt "$NNODES" ] || fail "NODE_RANK must be 0..$((NNODES - 1)), got $NODE_RANK"
if [ "$NNODES" -gt 1 ] && [ -z "$MASTER_ADDR" ]; then
  fail "NNODES=$NNODES needs MASTER_ADDR (the address of node 0, reachable from every node) and MASTER_PORT"
fi
PER_STEP=$((PER_DEVICE_BATCH * NPROC * NNODES))
if [ $((GLOBAL_BATCH % PER_STEP)) -ne 0 ]; then
  fail "GLOBAL_BATCH $GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH x NPROC x NNODES = $PER_DEVICE_BATCH x $NPROC x $NNODES = $PER_STEP: change one of them (the global batch is not rounded)"
fi
ACCUM=$((GLOBAL_BATCH / PER_STEP))
echo "global batch $GLOBAL_BATCH = $PER_DEVICE_BATCH per GPU x $NPROC GPUs x $NNODES nodes x $ACCUM accumulation"

if [ "$NNODES" -gt 1 ]; then
  # shellcheck disable=SC2089
  LAUNCH="$PYTHON -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NPROC --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
elif [ "$NPROC" -gt 1 ]; then
  LAUNCH="$PYTHON -m torch.distributed.run --standalone --nproc_per_node $NPROC"  # a free port of its own
else
  LAUNCH="$PYTHON"
fi

run() {  # print the command (quoted as a shell reads it back); run it unless DRY_RUN
  line="+"
  for a in "$@"; do
    case "$a" in ''|*[!A-Za-z0-9_./:=@%+,-]*) line="$line '$a'" ;; *) line="$line $a" ;; esac
  done
  echo "$line"
  [ -n "$DRY_RUN" ] || "$@"
}

distill() {  # teacher student_flag student output matches
  # --resume: an interrupted stage continues from its newest checkpoint; a finished one is skipped by train.py
  # shellcheck disable=SC2086
  run $LAUNCH "$ROOT/pretraining/train.py" --teacher "$1" "$2" "$3" --dataset "$DATASET" --output_dir "$4" \
    --matches "$5" --temperature "$TEMPERATURE" --learning_rate "$LR" --max_steps "$STEPS" \
    --batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$ACCUM" \
    --save_steps "$SAVE_STEPS" --eval_steps "$EVAL_STEPS" --resume $OVERWRITE_FLAG $BF16 $EXTRA
}

echo "== stage 1: $TEACHER -> RBT6 (teacher assistant)"
if [ "$NODE_RANK" -eq 0 ]; then
  # shellcheck disable=SC2086
  run "$PYTHON" "$ROOT/scripts/init_checkpoint_TA.py" --teacher "$TEACHER" --student_config rbt6 \
    --layer_map "$LAYER_MAP" --output "$OUT/rbt6_init" $OVERWRITE_FLAG
else  # one node builds it; the others wait for the complete folder on the shared filesystem
  run env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m minirbt.stages wait "model folder" \
    "$OUT/rbt6_init" --timeout "$WAIT_SECONDS"
fi
distill "$TEACHER" --student_init "$OUT/rbt6_init" "$OUT/rbt6" L12_L6_hidden_mse

echo "== stage 2: RBT6 -> MiniRBT-H256"
distill "$OUT/rbt6" --student_config minirbt_h256 "$OUT/minirbt_h256" L6_L6_hidden_mse_H256
echo "== stage 2: RBT6 -> MiniRBT-H288"
distill "$OUT/rbt6" --student_config minirbt_h288 "$OUT/minirbt_h288" L6_L6_hidden_mse_H288
echo "done: $OUT/rbt6, $OUT/minirbt_h256, $OUT/minirbt_h288"
