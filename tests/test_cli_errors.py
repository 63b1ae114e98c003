"""Every user mistake is one ``error:`` line and exit status 2, and no command touches what it was given.

One row per case: the real command line in a subprocess, against a workspace of real inputs (a corpus, refs, a
dataset, a teacher, a finished training run, a finished fine-tuning run, a user's own folder). Each row must exit
with status 2, print exactly one ``error:`` line (the last line of stderr) holding the expected words, and no
traceback; afterwards every file and folder of the workspace is byte-identical. The README's error table is
generated from these rows (``python tests/test_cli_errors.py`` prints it) and checked against them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_START, README_END = "<!-- cli-errors:start -->", "<!-- cli-errors:end -->"


@dataclass(frozen=True)
class Case:
    id: str
    mistake: str  # as the README states it
    script: str
    args: tuple[str, ...]  # "{ws}" is the workspace
    expect: str  # words the error line holds
    cwd: str | None = None  # relative to the workspace; default: the repository root
    env: tuple[tuple[str, str], ...] = ()  # set for the command (e.g. what torchrun sets)


REF = "pretraining/run_chinese_ref.py"
DATA = "pretraining/my_datasets.py"
TA = "scripts/init_checkpoint_TA.py"
TRAIN = "pretraining/train.py"
CLS = "finetuning/run_classification.py"
MRC = "finetuning/run_mrc.py"
NER = "finetuning/run_ner.py"
EXPORT = "scripts/export_onnx.py"
PRUNE = "scripts/prune_vocab.py"
REF_ARGS = ("--tokenizer", "{ws}/vocab", "--segmenter", "jieba", "--num_workers", "1")
DATA_ARGS = ("--train_file", "{ws}/corpus/a.txt", "--train_ref_file", "{ws}/a_ref.txt", "--tokenizer", "{ws}/vocab",
             "--max_seq_length", "64", "--num_workers", "1")
TRAIN_BASE = ("--teacher", "{ws}/teacher", "--student_config", "{ws}/s.json", "--dataset", "{ws}/ds",
              "--batch_size", "4", "--save_steps", "2", "--eval_steps", "0", "--min_teacher_accuracy", "0")
TRAIN_ARGS = (*TRAIN_BASE, "--max_steps", "2")
CLS_ARGS = ("--task", "chnsenticorp", "--model", "{ws}/teacher", "--train_file", "{ws}/ft/train.csv",
            "--dev_file", "{ws}/ft/dev.csv", "--epochs", "1", "--max_seq_length", "32", "--seeds", "1")
MRC_ARGS = ("--task", "cmrc2018", "--model", "{ws}/teacher", "--train_file", "{ws}/ft/mrc.json",
            "--dev_file", "{ws}/ft/mrc.json", "--output_dir", "{ws}/mrc_out")
NER_ARGS = ("--task", "peoples_daily", "--model", "{ws}/teacher", "--train_file", "{ws}/ft/ner_train.txt",
            "--dev_file", "{ws}/ft/ner_dev.txt", "--epochs", "1", "--max_seq_length", "32", "--output_dir", "{ws}/o")

CASES = [
    # stage 1: refs
    Case("ref-out-is-input", "refs written over the corpus file", REF,
         ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/corpus/a.txt", *REF_ARGS), "is the --input input"),
    Case("ref-folder-in-is-out", "a corpus folder given as input and output", REF,
         ("--input", "{ws}/corpus", "--output", "{ws}/corpus", *REF_ARGS), "is the --input input"),
    Case("ref-out-contains-input", "an output folder that holds the input", REF,
         ("--input", "{ws}/corpus", "--output", "{ws}", *REF_ARGS), "contains the --input input"),
    Case("ref-out-user-file", "refs written over a user's file", REF,
         ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/mine/notes.txt", *REF_ARGS),
         "holds a file this project did not write"),
    Case("ref-out-user-folder", "refs written into a user's folder", REF,
         ("--input", "{ws}/corpus", "--output", "{ws}/mine", *REF_ARGS), "holds files this project did not write"),
    Case("ref-out-cwd", "the current directory as output", REF,
         ("--input", "{ws}/corpus", "--output", ".", *REF_ARGS), "is the current directory", cwd="empty"),
    Case("ref-other-settings", "refs re-made with other settings", REF,
         ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/a_ref.txt", *REF_ARGS, "--encoding_errors", "replace"),
         "made with other settings (encoding_errors: strict -> replace)"),
    Case("ref-same-stem", "two corpus files with the same name stem", REF,
         ("--input", "{ws}/dup", "--output", "{ws}/dup_refs", *REF_ARGS), "several corpus files would write"),
    Case("ref-missing-input", "corpus missing", REF, ("--input", "{ws}/nope.txt", "--output", "{ws}/o.txt",
                                                      *REF_ARGS), "--input not found"),
    Case("ref-workers", "--num_workers 0", REF, ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/o.txt",
                                                 *REF_ARGS[:-2], "--num_workers", "0"), "--num_workers must be"),
    Case("ref-segmenter", "unknown segmenter", REF, ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/o.txt",
                                                     "--segmenter", "pkuseg"), "argument --segmenter"),
    Case("ref-ltp-missing", "LTP model folder missing", REF,
         ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/o.txt", "--tokenizer", "{ws}/vocab", "--segmenter",
          "ltp", "--ltp_model", "{ws}/nope"), "LTP model folder not found"),
    Case("ref-cuda", "--device cuda without CUDA", REF,
         ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/o.txt", *REF_ARGS, "--device", "cuda"),
         "no CUDA device"),
    Case("ref-tokenizer", "tokenizer folder missing", REF,
         ("--input", "{ws}/corpus/a.txt", "--output", "{ws}/o.txt", "--tokenizer", "{ws}/nope"),
         "tokenizer folder not found"),
    Case("ref-unknown-flag", "an unknown flag", REF, ("--input", "{ws}/corpus/a.txt", "--frobnicate"),
         "unrecognized arguments"),
    # stage 2: dataset
    Case("data-out-is-tokenizer", "dataset written over the tokenizer folder", DATA,
         (*DATA_ARGS, "--output_dir", "{ws}/vocab"), "is the --tokenizer input"),
    Case("data-out-user-folder", "dataset written into a user's folder", DATA,
         (*DATA_ARGS, "--output_dir", "{ws}/mine"), "holds files this project did not write"),
    Case("data-out-model", "dataset written over a model folder", DATA,
         (*DATA_ARGS, "--output_dir", "{ws}/teacher2"), "a model folder this command did not write"),
    Case("data-out-file", "an existing file as the dataset folder", DATA,
         (*DATA_ARGS, "--output_dir", "{ws}/mine/notes.txt"), "is an existing file, not a folder"),
    Case("data-out-contains-input", "a dataset folder that holds the corpus", DATA,
         (*DATA_ARGS, "--output_dir", "{ws}"), "contains the"),
    Case("data-other-settings", "a dataset re-made with other settings", DATA,
         (*DATA_ARGS[:-4], "--max_seq_length", "32", "--num_workers", "1", "--output_dir", "{ws}/ds"),
         "made with other settings (max_seq_length: 64 -> 32)"),
    Case("data-ref-count", "a ref file of another corpus", DATA,
         ("--train_file", "{ws}/corpus/a.txt", "--train_ref_file", "{ws}/bad/hello_ref.txt", "--tokenizer",
          "{ws}/vocab", "--output_dir", "{ws}/o"), "refs but"),
    Case("data-ref-misaligned", "a ref that does not point at a word's character", DATA,
         ("--train_file", "{ws}/bad/hello.txt", "--train_ref_file", "{ws}/bad/hello_ref.txt", "--tokenizer",
          "{ws}/vocab", "--output_dir", "{ws}/o", "--num_workers", "1"), "not a Chinese character continuing a word"),
    Case("data-cache-in-output", "a datasets cache inside the output folder", DATA,
         (*DATA_ARGS, "--output_dir", "{ws}/o", "--cache_dir", "{ws}/o/cache"), "is inside --output_dir"),
    Case("data-json-types", "a data.json whose entries are not file names", DATA,
         ("--data_files_json", "{ws}/bad/data.json", "--tokenizer", "{ws}/vocab", "--output_dir", "{ws}/o"),
         "'train' must be a file name or a list of file names"),
    Case("data-length", "--max_seq_length 0", DATA, (*DATA_ARGS[:-4], "--max_seq_length", "0", "--output_dir",
                                                     "{ws}/o"), "--max_seq_length must be"),
    Case("data-length-positions", "sequences longer than the model's positions", DATA,
         ("--train_file", "{ws}/corpus/a.txt", "--train_ref_file", "{ws}/a_ref.txt", "--tokenizer", "{ws}/teacher",
          "--max_seq_length", "1024", "--output_dir", "{ws}/o"), "max_position_embeddings 512"),
    Case("data-length-text", "a non-numeric length", DATA, (*DATA_ARGS[:-4], "--max_seq_length", "long",
                                                            "--output_dir", "{ws}/o"), "invalid int value"),
    # stage 3: teacher assistant
    Case("ta-out-is-teacher", "the teacher assistant written over the teacher", TA,
         ("--teacher", "{ws}/teacher", "--student_config", "{ws}/s.json", "--output", "{ws}/teacher"),
         "is the --teacher input"),
    Case("ta-out-model", "the teacher assistant written over another model", TA,
         ("--teacher", "{ws}/teacher", "--student_config", "{ws}/s.json", "--output", "{ws}/teacher2"),
         "a model folder this command did not write"),
    Case("ta-out-user-folder", "the teacher assistant written into a user's folder", TA,
         ("--teacher", "{ws}/teacher", "--student_config", "{ws}/s.json", "--output", "{ws}/mine"),
         "holds files this project did not write"),
    Case("ta-other-settings", "a teacher assistant re-made with another layer map", TA,
         ("--teacher", "{ws}/teacher", "--student_config", "{ws}/s.json", "--layer_map", "uniform", "--output",
          "{ws}/ta"), "made with other settings (layers: [0, 1] -> [0, 3])"),
    Case("ta-layer-map", "a bad layer map", TA, ("--teacher", "{ws}/teacher", "--student_config", "{ws}/s.json",
                                                 "--layer_map", "0,9", "--output", "{ws}/o"), "out of range"),
    Case("ta-no-teacher", "teacher folder missing", TA, ("--teacher", "{ws}/nope", "--output", "{ws}/o"),
         "teacher not found"),
    Case("ta-config", "student config missing", TA, ("--teacher", "{ws}/teacher", "--student_config", "nope",
                                                     "--output", "{ws}/o"), "student config not found"),
    # stage 4: distillation
    Case("train-out-is-teacher", "a run written over the teacher", TRAIN, (*TRAIN_ARGS, "--output_dir",
                                                                          "{ws}/teacher"), "is the --teacher input"),
    Case("train-out-is-dataset", "a run written over the dataset", TRAIN, (*TRAIN_ARGS, "--output_dir", "{ws}/ds"),
         "is the --dataset input"),
    Case("train-out-model", "a run written over another model folder", TRAIN,
         (*TRAIN_ARGS, "--output_dir", "{ws}/teacher2"), "a model folder this command did not write"),
    Case("train-out-user-folder", "a run written into a user's folder", TRAIN,
         (*TRAIN_ARGS, "--output_dir", "{ws}/mine"), "holds files this project did not write"),
    Case("train-out-contains-input", "a run folder that holds the inputs", TRAIN,
         (*TRAIN_ARGS, "--output_dir", "{ws}"), "contains the --teacher input"),
    Case("train-resume-other-lr", "--resume of a run with another learning rate", TRAIN,
         (*TRAIN_ARGS, "--output_dir", "{ws}/run", "--resume", "--learning_rate", "1e-3"),
         "made with other settings (learning_rate: 0.0004 -> 0.001)"),
    Case("train-rerun-other-steps", "a finished run re-run with more steps", TRAIN,
         (*TRAIN_BASE, "--max_steps", "5", "--output_dir", "{ws}/run", "--resume"),
         "--resume --accept_changed max_steps"),
    Case("train-resume-mlm-only", "--resume of a KD run as MLM-only", TRAIN,
         ("--tokenizer", "{ws}/vocab", *TRAIN_ARGS[2:], "--output_dir", "{ws}/run", "--resume"),
         "kd_weight: 1.0 -> 0.0"),
    Case("train-students-shared", "a --students entry that sets a shared setting", TRAIN,
         (*TRAIN_ARGS[:2], *TRAIN_ARGS[4:], "--students", "{ws}/students_shared.json"),
         "shared settings ['max_steps'] belong on the command line"),
    Case("train-students-over-teacher", "a second student written over the teacher (--students)", TRAIN,
         (*TRAIN_ARGS[:2], *TRAIN_ARGS[4:], "--students", "{ws}/students_teacher.json"), "is the --teacher input"),
    Case("train-steps-below", "--max_steps below the checkpoint's step", TRAIN,
         (*TRAIN_BASE, "--max_steps", "1", "--output_dir", "{ws}/run", "--resume", "--accept_changed",
          "max_steps"), "is below the step of the newest checkpoint"),
    Case("train-accept-lr", "--accept_changed of a setting that cannot change", TRAIN,
         (*TRAIN_ARGS, "--output_dir", "{ws}/run", "--resume", "--accept_changed", "learning_rate"),
         "only max_steps may change"),
    Case("train-match-types", "a match whose layer is not an integer", TRAIN,
         (*TRAIN_ARGS, "--matches", '[{"layer_T": "2", "layer_S": 1, "feature": "hidden", "loss": "hidden_mse"}]',
          "--output_dir", "{ws}/o"), "layer_T must be a layer index"),
    Case("train-teacher-no-head", "a teacher checkpoint without its MLM head", TRAIN,
         ("--teacher", "{ws}/encoder_only", *TRAIN_ARGS[2:], "--output_dir", "{ws}/o"), "has no MLM head"),
    Case("train-teacher-floor", "a teacher that predicts no better than chance", TRAIN,
         (*TRAIN_BASE[:-2], "--max_steps", "2", "--output_dir", "{ws}/o"), "below --min_teacher_accuracy 0.01"),
    Case("ta-teacher-no-head", "a teacher assistant copying a head the teacher lacks", TA,
         ("--teacher", "{ws}/encoder_only", "--student_config", "{ws}/s.json", "--output", "{ws}/o"),
         "has no MLM head"),
    Case("train-steps", "--max_steps 0", TRAIN, (*TRAIN_BASE, "--max_steps", "0", "--output_dir", "{ws}/o"),
         "--max_steps must be"),
    Case("train-lr", "a negative learning rate", TRAIN, (*TRAIN_ARGS, "--learning_rate", "-1", "--output_dir",
                                                         "{ws}/o"), "--learning_rate must be"),
    Case("train-mlm-prob", "--mlm_probability 1.5", TRAIN, (*TRAIN_ARGS, "--mlm_probability", "1.5",
                                                            "--output_dir", "{ws}/o"), "--mlm_probability must be"),
    Case("train-warmup", "--warmup_ratio 1", TRAIN, (*TRAIN_ARGS, "--warmup_ratio", "1", "--output_dir", "{ws}/o"),
         "--warmup_ratio must be"),
    Case("train-seed", "a negative seed", TRAIN, (*TRAIN_ARGS, "--seed", "-1", "--output_dir", "{ws}/o"),
         "--seed must be"),
    Case("train-kd-nan", "--kd_weight nan", TRAIN, (*TRAIN_ARGS, "--kd_weight", "nan", "--output_dir", "{ws}/o"),
         "--kd_weight must be"),
    Case("train-batch-text", "a non-numeric batch size", TRAIN, (*TRAIN_ARGS, "--batch_size", "x", "--output_dir",
                                                                 "{ws}/o"), "argument --batch_size"),
    Case("train-cuda", "--device cuda without CUDA", TRAIN, (*TRAIN_ARGS, "--device", "cuda", "--output_dir",
                                                             "{ws}/o"), "no CUDA device"),
    Case("train-no-dataset", "dataset missing", TRAIN, ("--teacher", "{ws}/teacher", "--student_config",
                                                        "{ws}/s.json", "--dataset", "{ws}/nope", "--output_dir",
                                                        "{ws}/o"), "is not a dataset made by"),
    Case("train-positions", "dataset sequences longer than the student's positions", TRAIN,
         ("--teacher", "{ws}/teacher", "--student_config", "{ws}/short.json", "--dataset", "{ws}/ds",
          "--output_dir", "{ws}/o"), "longer than the student's max_position_embeddings 32"),
    # stage 5: fine-tuning
    Case("ft-out-is-model", "fine-tuning written over the model", CLS, (*CLS_ARGS, "--output_dir", "{ws}/teacher"),
         "is the --model input"),
    Case("ft-out-is-train", "fine-tuning written over the training file", CLS,
         (*CLS_ARGS, "--output_dir", "{ws}/ft/train.csv"), "is the --train_file input"),
    Case("ft-out-user-folder", "fine-tuning written into a user's folder", CLS,
         (*CLS_ARGS, "--output_dir", "{ws}/mine"), "holds files this project did not write"),
    Case("ft-other-settings", "a finished fine-tuning run re-run with another learning rate", CLS,
         (*CLS_ARGS, "--learning_rate", "1e-3", "--output_dir", "{ws}/ft_done"),
         "made with other settings (learning_rate: 0.0005 -> 0.001)"),
    Case("ft-blank-labels", "a training file with most labels blank", CLS,
         (*CLS_ARGS[:4], "--train_file", "{ws}/ft/blank.csv", *CLS_ARGS[6:], "--output_dir", "{ws}/o"),
         "are unusable (40 no gold label"),
    Case("ft-no-labels", "a sentence-pair file without labels", CLS,
         ("--task", "lcqmc", "--model", "{ws}/teacher", "--train_file", "{ws}/ft/nolabel.tsv", "--dev_file",
          "{ws}/ft/nolabel.tsv", "--output_dir", "{ws}/o"), "no usable training examples"),
    Case("ft-seeds", "seeds that are not integers", CLS, (*CLS_ARGS[:-2], "--seeds", "1,x", "--output_dir",
                                                          "{ws}/o"), "--seeds must be"),
    Case("ft-epochs", "--epochs 0", CLS, (*CLS_ARGS, "--epochs", "0", "--output_dir", "{ws}/o"), "--epochs must be"),
    Case("ft-length", "--max_seq_length beyond the model's positions", CLS,
         (*CLS_ARGS, "--max_seq_length", "1000", "--output_dir", "{ws}/o"), "max_position_embeddings 512"),
    Case("ft-missing-train", "training file missing", CLS,
         (*CLS_ARGS[:4], "--train_file", "{ws}/nope.csv", *CLS_ARGS[6:], "--output_dir", "{ws}/o"),
         "data file not found"),
    Case("ft-cuda", "--device cuda without CUDA", CLS, (*CLS_ARGS, "--device", "cuda", "--output_dir", "{ws}/o"),
         "no CUDA device"),
    Case("ft-torchrun", "fine-tuning started by torchrun on several GPUs", CLS,
         (*CLS_ARGS, "--output_dir", "{ws}/o"), "run one process per GPU instead",
         env=(("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"))),
    Case("mrc-torchrun", "reading comprehension started by torchrun", MRC, MRC_ARGS, "WORLD_SIZE=4",
         env=(("WORLD_SIZE", "4"), ("RANK", "0"), ("LOCAL_RANK", "0"))),
    Case("mrc-answers-outside", "reading comprehension answers that are not in their context", MRC,
         ("--task", "cmrc2018", "--model", "{ws}/teacher", "--train_file", "{ws}/ft/mrc_bad.json", "--dev_file",
          "{ws}/ft/mrc.json", "--output_dir", "{ws}/o"), "no usable training examples"),
    Case("mrc-window", "windows too small for question and context", MRC,
         (*MRC_ARGS, "--max_seq_length", "20", "--doc_stride", "8"), "context tokens per window"),
    Case("mrc-stride", "a stride longer than the window", MRC, (*MRC_ARGS, "--doc_stride", "600"),
         "--doc_stride 600 must be below --max_seq_length 512"),
    Case("mrc-test-file", "a reading-comprehension test file that is not there", MRC,
         (*MRC_ARGS, "--test_file", "{ws}/ft/none.json"), "none.json"),
    Case("mrc-augment", "--augment given to run_mrc.py", MRC, (*MRC_ARGS, "--augment", "1"),
         "unrecognized arguments: --augment"),
    Case("ner-malformed", "an NER line without its tag", NER,
         (*NER_ARGS[:5], "{ws}/ft/ner_notag.txt", *NER_ARGS[6:]), "ner_notag.txt:3: expected 'token tag'"),
    Case("ner-bad-tag", "an NER tag that is not BIO", NER, (*NER_ARGS[:5], "{ws}/ft/ner_badtag.txt", *NER_ARGS[6:]),
         "ner_badtag.txt:2: tag 'PER' is not O or B-"),
    Case("ner-unknown-tag", "a dev tag the training file never has", NER,
         (*NER_ARGS[:7], "{ws}/ft/ner_badtag_dev.txt", *NER_ARGS[8:]), "tags never seen in the training file: B-ORG"),
    Case("ner-empty", "an empty NER file", NER, (*NER_ARGS[:7], "{ws}/ft/ner_empty.txt", *NER_ARGS[8:]),
         "ner_empty.txt: no tagged tokens"),
    Case("ner-peoples-daily-out", "the NER data set written into a user's folder", "scripts/peoples_daily_ner.py",
         ("--output", "{ws}/mine", "--train", "5", "--dev", "2", "--test", "2"), "holds files this project did not"),
    # the rest
    Case("demo-out-user-folder", "the demo written into a user's folder", "scripts/demo.py",
         ("--quick", "--output_dir", "{ws}/mine"), "holds files this project did not write"),
    Case("demo-steps", "--steps without --teacher", "scripts/demo.py", ("--steps", "10"), "give --teacher too"),
    Case("convert-pickle", "a pickle that would run code", "scripts/convert_checkpoint.py",
         ("--checkpoint", "{ws}/evil.pkl", "--config", "{ws}/s.json", "--vocab", "{ws}/vocab", "--output",
          "{ws}/o"), "would call"),
    Case("convert-out-is-vocab", "a converted model written over its vocab folder", "scripts/convert_checkpoint.py",
         ("--checkpoint", "{ws}/evil.pkl", "--config", "{ws}/s.json", "--vocab", "{ws}/vocab", "--output",
          "{ws}/vocab"), "is the --vocab input"),
    Case("ltp-out-user-folder", "the LTP model written into a user's folder", "scripts/train_ltp_cws.py",
         ("--output", "{ws}/mine"), "holds files this project did not write"),
    Case("ltp-epochs", "--epochs 0", "scripts/train_ltp_cws.py", ("--output", "{ws}/o", "--epochs", "0"),
         "--epochs must be"),
    # deployment
    Case("export-no-weights", "a model folder without weights", EXPORT,
         ("--model", "{ws}/no_weights", "--output", "{ws}/o"), "lacks model.safetensors"),
    Case("export-task", "an unknown --task", EXPORT, ("--model", "{ws}/teacher", "--output", "{ws}/o", "--task",
                                                      "pos"), "argument --task: invalid choice: 'pos'"),
    Case("export-no-head", "a classification export of a model never fine-tuned", EXPORT,
         ("--model", "{ws}/teacher", "--output", "{ws}/o", "--task", "classification"),
         "has no classification head"),
    Case("export-out-is-model", "an export written over its model folder", EXPORT,
         ("--model", "{ws}/teacher", "--output", "{ws}/teacher"), "is the --model input"),
    Case("export-dev-mlm", "a dev file for a head without a dev metric", EXPORT,
         ("--model", "{ws}/teacher", "--output", "{ws}/o", "--dev_file", "{ws}/ft/dev.csv"), "has no dev metric"),
    Case("export-dev-task", "a dev file of unknown format", EXPORT,
         ("--model", "{ws}/ft_done/best", "--output", "{ws}/o", "--dev_file", "{ws}/ft/dev.csv", "--dev_task",
          "squad"), "--dev_task must be one of"),
    Case("prune-foreign-corpus", "a corpus sharing no token with the vocabulary", PRUNE,
         ("--model", "{ws}/teacher", "--corpus", "{ws}/thai.txt", "--output", "{ws}/o"), "shares no token"),
    Case("prune-out-user-folder", "a pruned model written into a user's folder", PRUNE,
         ("--model", "{ws}/teacher", "--corpus", "{ws}/corpus/a.txt", "--output", "{ws}/mine"),
         "holds files this project did not write"),
    Case("prune-min-count", "--min_count 0", PRUNE,
         ("--model", "{ws}/teacher", "--corpus", "{ws}/corpus/a.txt", "--output", "{ws}/o", "--min_count", "0"),
         "--min_count must be"),
]


def render_table(cases: list[Case] = CASES) -> str:
    rows = ["| command | mistake | the error line holds |", "|---|---|---|"]
    for c in cases:
        rows.append(f"| `{Path(c.script).name}` | {c.mistake} | `{c.expect}` |")
    return "\n".join(rows)


# ------------------------------------------------------------------ the workspace
def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", p.stat().st_mode)
        else:
            out[rel] = ("file", p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, vocab_dir, tiny_teacher, real_lines, shared_data) -> Path:
    import torch
    from conftest import run_script, tiny_bert

    from minirbt.classification import ClassificationArguments as FinetuneArguments
    from minirbt.classification import run_classification
    from minirbt.data import build_pretraining_dataset
    from minirbt.refs import RefBuilder, write_ref_file
    from minirbt.segmentation import make_segmenter
    from minirbt.tokenization import LineTokenizer, load_tokenizer
    from minirbt.trainer import DistillArguments, train

    ws = tmp_path_factory.mktemp("cli_ws")
    shutil.copytree(vocab_dir, ws / "vocab")
    shutil.copytree(tiny_teacher, ws / "teacher")
    shutil.copytree(tiny_teacher, ws / "teacher2")
    from transformers import BertModel

    BertModel.from_pretrained(str(tiny_teacher)).save_pretrained(str(ws / "encoder_only"))  # no cls.* weights
    shutil.copy(tiny_teacher / "vocab.txt", ws / "encoder_only" / "vocab.txt")
    (ws / "corpus").mkdir()
    (ws / "corpus" / "a.txt").write_text("\n".join(real_lines[:150]) + "\n", encoding="utf-8")
    (ws / "corpus" / "b.txt").write_text("\n".join(real_lines[150:200]) + "\n", encoding="utf-8")
    (ws / "dup").mkdir()
    for name in ("x.txt", "x.csv"):
        (ws / "dup" / name).write_text("今天天气很好\n", encoding="utf-8")
    (ws / "bad").mkdir()
    (ws / "bad" / "hello.txt").write_text("Hello世界\n", encoding="utf-8")
    (ws / "bad" / "hello_ref.txt").write_text("[1]\n")  # marks "hello", not a character of a Chinese word
    (ws / "bad" / "data.json").write_text(json.dumps({"train": 5, "train_ref": ["a_ref.txt"]}))
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("a user's own file\n")
    (ws / "empty").mkdir()
    (ws / "no_weights").mkdir()
    for name in ("config.json", "vocab.txt"):
        shutil.copy(tiny_teacher / name, ws / "no_weights" / name)
    (ws / "thai.txt").write_text("สวัสดีครับ ยินดีต้อนรับ\n" * 3, encoding="utf-8")  # no token of a Chinese vocab
    cfg = tiny_bert(layers=2, hidden=64, heads=4, ffn=128).config.to_dict()
    (ws / "s.json").write_text(json.dumps(cfg))
    (ws / "short.json").write_text(json.dumps(cfg | {"max_position_embeddings": 32}))
    first = {"output_dir": str(ws / "students_a"), "student_config": str(ws / "s.json")}
    (ws / "students_shared.json").write_text(json.dumps([first | {"max_steps": 3}]))
    (ws / "students_teacher.json").write_text(json.dumps([first, {"output_dir": str(ws / "teacher"),
                                                                  "student_config": str(ws / "s.json")}]))
    torch.save({"bert.embeddings.word_embeddings.weight": _Exploit(ws / "pwned")}, ws / "evil.pkl")
    # outputs made by the project: refs (the CLI, with its record), a teacher assistant, a dataset, a finished
    # training run and a finished fine-tuning run
    run_script(REF, "--input", ws / "corpus" / "a.txt", "--output", ws / "a_ref.txt", "--tokenizer", ws / "vocab",
               "--segmenter", "jieba", "--num_workers", "1")
    run_script(TA, "--teacher", ws / "teacher", "--student_config", ws / "s.json", "--layer_map", "first",
               "--output", ws / "ta")
    build_pretraining_dataset([ws / "corpus" / "a.txt"], [ws / "a_ref.txt"], ws / "vocab", ws / "ds",
                              max_seq_length=64)
    train(DistillArguments(teacher=str(ws / "teacher"), student_config=str(ws / "s.json"), dataset=str(ws / "ds"),
                           output_dir=str(ws / "run"), max_steps=2, batch_size=4, save_steps=2, eval_steps=0,
                           min_teacher_accuracy=0))
    _fine_tuning_files(ws / "ft", shared_data)
    builder = RefBuilder(LineTokenizer(load_tokenizer(ws / "vocab")), make_segmenter("jieba"))
    write_ref_file(builder, ws / "corpus" / "b.txt", ws / "b_ref.txt", progress=False)
    run_classification(FinetuneArguments(task="chnsenticorp", model=str(ws / "teacher"),
                                         train_file=str(ws / "ft" / "train.csv"), dev_file=str(ws / "ft" / "dev.csv"),
                                         output_dir=str(ws / "ft_done"), epochs=1, max_seq_length=32, seeds="1",
                                         learning_rate=5e-4))
    return ws


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _fine_tuning_files(folder: Path, shared_data: Path) -> None:
    import csv

    folder.mkdir()
    with open(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["review"].strip()][::97][:80]

    def write(name: str, part: list[dict], blank_every: int = 0) -> None:
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "review"])
            for i, r in enumerate(part):
                w.writerow(["" if blank_every and i % blank_every else r["label"], r["review"]])

    write("train.csv", rows[:50])
    write("dev.csv", rows[50:80])
    write("blank.csv", rows[:60], blank_every=3)  # 2 of every 3 labels blank: 40 of 60
    (folder / "nolabel.tsv").write_text("".join(f"{r['review'][:20]}\t{r['review'][-20:]}\n" for r in rows[:20]),
                                        encoding="utf-8")
    doc = json.loads((shared_data / "cmrc2018" / "trial.json").read_text(encoding="utf-8"))
    small = {"version": "v1", "data": doc["data"][:3]}
    (folder / "mrc.json").write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
    for d in small["data"]:
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                for a in qa["answers"]:
                    a["text"] = "这个答案不在文中"  # in no context: nothing to learn from
    (folder / "mrc_bad.json").write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
    ner = "张\tB-PER\n三\tI-PER\n在\tO\n北\tB-LOC\n京\tI-LOC\n\n他\tO\n好\tO\n"
    (folder / "ner_train.txt").write_text(ner * 5, encoding="utf-8")
    (folder / "ner_dev.txt").write_text(ner, encoding="utf-8")
    (folder / "ner_notag.txt").write_text("张\tB-PER\n三\tI-PER\n在\n", encoding="utf-8")
    (folder / "ner_badtag.txt").write_text("张\tB-PER\n三\tPER\n", encoding="utf-8")
    (folder / "ner_badtag_dev.txt").write_text(ner + "\n新\tB-ORG\n华\tI-ORG\n社\tI-ORG\n", encoding="utf-8")
    (folder / "ner_empty.txt").write_text("\n\n", encoding="utf-8")


@pytest.fixture(scope="module")
def outcomes(workspace) -> tuple[dict[str, subprocess.CompletedProcess], dict, dict]:
    """Every row run once (two at a time: the machines have two cores), with the workspace before and after."""
    before = _snapshot(workspace)

    def run(case: Case) -> subprocess.CompletedProcess:
        args = [a.replace("{ws}", str(workspace)) for a in case.args]
        cwd = workspace / case.cwd if case.cwd else ROOT
        return subprocess.run([sys.executable, str(ROOT / case.script), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, **dict(case.env)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip([c.id for c in CASES], pool.map(run, CASES)))
    return results, before, _snapshot(workspace)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mistake_is_one_error_line(case, outcomes):
    proc = outcomes[0][case.id]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = f"rc {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr, shown
    assert [line for line in err if line.startswith("error:")] == [err[-1]], shown
    assert case.expect in err[-1], shown


def test_no_row_changed_the_workspace(outcomes, workspace):
    _, before, after = outcomes
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, changed
    assert not (workspace / "pwned").exists()


@pytest.mark.parametrize("script", ["pretraining/run_chinese_ref.py", "pretraining/my_datasets.py",
                                    "pretraining/train.py", "scripts/init_checkpoint_TA.py", "scripts/demo.py",
                                    "finetuning/run_classification.py", "finetuning/run_mrc.py",
                                    "finetuning/run_ner.py", "scripts/peoples_daily_ner.py",
                                    "scripts/export_onnx.py", "scripts/prune_vocab.py"])
def test_every_script_explains_its_flags(script):
    """--help prints every flag with its help (argparse formats help strings with %: a bare % breaks it)."""
    from conftest import run_script

    proc = run_script(script, "--help")
    assert "usage:" in proc.stdout and "--output" in proc.stdout
    if script.endswith("train.py"):
        assert "--recipe" in proc.stdout and "--max_grad_norm" in proc.stdout and "0.005%" in proc.stdout


def test_rows_are_distinct():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.script, c.args) for c in CASES}) == len(CASES)


def test_readme_error_table_matches_the_rows():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_START in readme and README_END in readme, "README lacks the generated error table"
    table = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert table == render_table(), "README error table is stale: regenerate with python tests/test_cli_errors.py"


if __name__ == "__main__":
    print(render_table())
