"""Export a model folder to ONNX (and int8), checked against PyTorch, in Optimum's folder layout.

    python scripts/export_onnx.py --model outputs/ft/chnsenticorp/best --output outputs/onnx/chnsenticorp --int8 \
        --dev_file data/chnsenticorp/dev.tsv
    python scripts/export_onnx.py --model outputs/minirbt_h256 --output outputs/onnx/h256_encoder --task encoder

--task auto reads the head from config.json: a pretrained student (mlm), a run_classification.py /
run_mrc.py / run_ner.py best/ folder (classification / mrc / ner); --task encoder exports BertModel
(last_hidden_state).
The output folder holds model.onnx (+ model_quantized.onnx with --int8), config.json, the tokenizer
files and export_report.json (max |ONNX - PyTorch| on real text; with --dev_file the task metric of
PyTorch fp32, ONNX fp32 and int8). Load it with onnxruntime.InferenceSession(folder/model.onnx).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import OVERWRITE_HELP, ArgumentParser, run  # noqa: E402
from minirbt.export import TASKS, export_folder, report_lines  # noqa: E402


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Model folder or Hugging Face model id.")
    ap.add_argument("--output", required=True, help="Output folder (written atomically; never an input).")
    ap.add_argument("--task", default="auto", choices=("auto", *TASKS),
                    help="Which head to export (default auto: the folder's architectures).")
    ap.add_argument("--int8", action="store_true", help="Also write model_quantized.onnx (dynamic int8).")
    ap.add_argument("--dev_file", help="Score PyTorch fp32, ONNX fp32 and int8 on this file (task's format).")
    ap.add_argument("--dev_task", help="Task of --dev_file (chnsenticorp, ocnli, ..., cmrc2018, drcd; default: "
                                       "the fine-tuning run's, when --model is its best/ folder).")
    ap.add_argument("--max_seq_length", type=int, help="Tokens per --dev_file input (default: the run's).")
    ap.add_argument("--atol", type=float, default=1e-4,
                    help="Refuse the export when ONNX fp32 differs from PyTorch by more (default 1e-4).")
    ap.add_argument("--opset", type=int, help="ONNX opset (default 17).")
    ap.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args()
    if args.max_seq_length is not None and args.max_seq_length < 8:
        ap.error(f"--max_seq_length must be at least 8, got {args.max_seq_length}")
    if not args.atol > 0:
        ap.error(f"--atol must be > 0, got {args.atol}")
    report = export_folder(args.model, args.output, args.task, args.int8, args.dev_file, args.dev_task,
                           args.max_seq_length, args.atol, args.opset, args.overwrite_output)
    for line in report_lines(report, args.output):
        print(line)


if __name__ == "__main__":
    run(main)
