#!/bin/sh
# The MiniRBT recipe, two stages, as pretraining/recipes/minirbt.toml lists them (RECIPE=... for another):
#   stage 1: teacher (RoBERTa-wwm-ext) -> RBT6 teacher assistant, initialised from the teacher's layers
#   stage 2: RBT6 -> MiniRBT-H256 and RBT6 -> MiniRBT-H288
# Each stage is `pretraining/train.py --recipe RECIPE --stage NAME` plus where things are; the recipe's settings
# (and train.py's defaults, which are MiniRBT's) hold unless a variable below overrides them.
# Run as `sh pretraining/distill.sh` from the repository root or `sh distill.sh` from pretraining/.
#   TEACHER=... DATASET=... OUT=... NPROC=8 sh pretraining/distill.sh                  # one node, 8 GPUs
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 sh pretraining/distill.sh  # on each node
#   DRY_RUN=1 ... sh pretraining/distill.sh        # print the exact commands, run nothing
# On several nodes, OUT, DATASET and the teacher must be on a filesystem every node sees: node 0 builds the
# teacher assistant, the others wait for it; checkpoints are written by global rank 0 and read by every rank.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

DEFAULT_TEACHER=$ROOT/pretrained_model_path/RoBERTa-wwm-ext  # or RoBERTa (MiniRBT's name) when only that exists
[ ! -d "$ROOT/pretrained_model_path/RoBERTa" ] || [ -d "$DEFAULT_TEACHER" ] || DEFAULT_TEACHER=$ROOT/pretrained_model_path/RoBERTa
TEACHER=${TEACHER:-$DEFAULT_TEACHER}  # a folder, or a model id such as hfl/chinese-roberta-wwm-ext
DATASET=${DATASET:-$ROOT/dataset/cached}
OUT=${OUT:-$ROOT/outputs}
NPROC=${NPROC:-1}                 # GPUs per node (torchrun --nproc_per_node)
NNODES=${NNODES:-1}               # nodes (torchrun --nnodes)
NODE_RANK=${NODE_RANK:-0}         # this node's rank, 0..NNODES-1
MASTER_ADDR=${MASTER_ADDR:-}      # several nodes: the address of node 0 ...
MASTER_PORT=${MASTER_PORT:-29500} # ... and a free port on it
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}
PYTHON=${PYTHON:-python}
RECIPE=${RECIPE:-$HERE/recipes/minirbt.toml}  # the stages and their settings (MiniRBT's); see its comments
# Empty: the recipe's value (or train.py's default, which is MiniRBT's); set to override it for every stage.
GLOBAL_BATCH=${GLOBAL_BATCH:-}    # sequences per optimizer step (the recipe's global_batch: 4096)
STEPS=${STEPS:-}                  # --max_steps
LR=${LR:-}                        # --learning_rate
TEMPERATURE=${TEMPERATURE:-}      # --temperature
LAYER_MAP=${LAYER_MAP:-}          # the teacher assistant's layers (the recipe's [ta_init] layer_map)
SAVE_STEPS=${SAVE_STEPS:-}        # --save_steps
EVAL_STEPS=${EVAL_STEPS:-}        # --eval_steps
BF16=${BF16:-}                    # 1: bf16 autocast, 0: fp32 (the recipe: bf16)
EXTRA=${EXTRA:-}                  # more train.py flags, e.g. "--mlm_weight 1"
OVERWRITE=${OVERWRITE:-}          # OVERWRITE=1: replace earlier outputs made with other settings
DRY_RUN=${DRY_RUN:-}              # DRY_RUN=1: print the commands only
WAIT_SECONDS=${WAIT_SECONDS:-86400}  # nodes > 0: how long to wait for node 0's teacher assistant
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
recipe() {  # python -m minirbt.recipe stages "$RECIPE" ...: what the recipe says, for this script
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m minirbt.recipe stages "$RECIPE" "$@"
}
PLAN=$(recipe) || exit 2
STAGES=$(echo "$PLAN" | grep -E '^(stage|pass) ' || true)  # "pass": stages trained from one teacher pass
TA_INIT=$(echo "$PLAN" | sed -n 's/^ta_init //p')
[ -n "$GLOBAL_BATCH" ] || GLOBAL_BATCH=$(echo "$PLAN" | sed -n 's/^global_batch //p')
for v in NPROC NNODES PER_DEVICE_BATCH GLOBAL_BATCH; do
  eval "x=\$$v"
  case "$x" in ''|*[!0-9]*|0) fail "$v must be a positive integer, got '$x'" ;; esac
done
case "$BF16" in ''|0|1) ;; *) fail "BF16 must be 1 (bf16 autocast) or 0 (fp32), got '$BF16'" ;; esac
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

# Flags given only when their variable is set: the recipe's values otherwise.
OVERRIDES=
[ -z "$STEPS" ] || OVERRIDES="$OVERRIDES --max_steps $STEPS"
[ -z "$LR" ] || OVERRIDES="$OVERRIDES --learning_rate $LR"
[ -z "$TEMPERATURE" ] || OVERRIDES="$OVERRIDES --temperature $TEMPERATURE"
[ -z "$SAVE_STEPS" ] || OVERRIDES="$OVERRIDES --save_steps $SAVE_STEPS"
[ -z "$EVAL_STEPS" ] || OVERRIDES="$OVERRIDES --eval_steps $EVAL_STEPS"
case "$BF16" in 1) OVERRIDES="$OVERRIDES --bf16 true" ;; 0) OVERRIDES="$OVERRIDES --bf16 false" ;; esac

# shellcheck disable=SC2086
set -- $TA_INIT  # name, config, layer map
TA_NAME=$1
TA_CONFIG=$2
[ -n "$LAYER_MAP" ] || LAYER_MAP=$3
echo "== teacher assistant: $OUT/$TA_NAME ($TA_CONFIG from the teacher's layers, $LAYER_MAP)"
if [ "$NODE_RANK" -eq 0 ]; then
  # shellcheck disable=SC2086
  run "$PYTHON" "$ROOT/scripts/init_checkpoint_TA.py" --teacher "$TEACHER" --student_config "$TA_CONFIG" \
    --layer_map "$LAYER_MAP" --output "$OUT/$TA_NAME" $OVERWRITE_FLAG
else  # one node builds it; the others wait for the complete folder on the shared filesystem
  run env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m minirbt.stages wait "model folder" \
    "$OUT/$TA_NAME" --timeout "$WAIT_SECONDS"
fi

# Every stage of the recipe (not its baselines), in order: NAME TEACHER --student_init|--student_config STUDENT.
# --resume: an interrupted stage continues from its newest checkpoint; a finished one is skipped by train.py.
while read -r kind name teacher student_flag student; do
  [ "$teacher" = teacher ] && from=$TEACHER || from=$OUT/$teacher
  if [ "$kind" = pass ]; then  # several students, one teacher forward per batch: train.py --students
    first=${student_flag%%,*}
    list=$OUT/.$name.students.json
    echo "== $name: $from -> $(echo "$student_flag" | tr ',' ' ') (one teacher pass)"
    run env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m minirbt.recipe students "$RECIPE" "$name" \
      "$OUT" "$list"
    run $LAUNCH "$ROOT/pretraining/train.py" --recipe "$RECIPE" --stage "$first" --teacher "$from" \
      --students "$list" --dataset "$DATASET" \
      --batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$ACCUM" --resume $OVERRIDES \
      $OVERWRITE_FLAG $EXTRA
    continue
  fi
  [ "$student_flag" = --student_init ] && student=$OUT/$student
  echo "== $name: $from -> $OUT/$name"
  run $LAUNCH "$ROOT/pretraining/train.py" --recipe "$RECIPE" --stage "$name" --teacher "$from" \
    "$student_flag" "$student" --dataset "$DATASET" --output_dir "$OUT/$name" \
    --batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$ACCUM" --resume $OVERRIDES \
    $OVERWRITE_FLAG $EXTRA
done <<STAGES
$STAGES
STAGES
echo "done: $(echo "$STAGES" | while read -r kind name _ members _; do
  if [ "$kind" = pass ]; then for m in $(echo "$members" | tr ',' ' '); do printf '%s ' "$OUT/$m"; done
  else printf '%s ' "$OUT/$name"; fi; done)"
