"""Stage 1: refs identical to the reference algorithm, on real text, both segmenters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script
from hypothesis import given, settings
from hypothesis import strategies as st

from minirbt.refs import (
    RefBuilder,
    RefSpec,
    RefWriter,
    _blocks,
    reference_prepare_ref,
    reference_ref,
    whole_word_ref,
    write_ref_file,
)
from minirbt.segmentation import make_segmenter
from minirbt.textio import CorpusError, iter_lines
from minirbt.tokenization import LineTokenizer


def test_hand_checked_example():
    tokens = ["[CLS]", "我", "喜", "欢", "自", "然", "语", "言", "处", "理", "ok", "中", "国", "[SEP]"]
    words = ["我", "喜欢", "自然语言", "处理", "ok", "中国", "自然"]
    # 喜欢 -> 3; 自然语言 (longest match wins over 自然) -> 5,6,7; 处理 -> 9; 中国 -> 12
    assert reference_ref(tokens, words) == [3, 5, 6, 7, 9, 12]
    assert whole_word_ref(tokens, words) == [3, 5, 6, 7, 9, 12]
    # words match wherever they occur, even where the segmenter cut differently (as in the reference)
    assert whole_word_ref(["[CLS]", "中", "国", "人", "中", "国", "[SEP]"], ["中国人", "中国"]) == [2, 3, 5]
    # a window holding a non-CJK token never matches; single-character and mixed words never count
    assert whole_word_ref(["[CLS]", "中", "[UNK]", "国", "[SEP]"], ["中国", "中x国"]) == []
    assert whole_word_ref(["[CLS]", "a", "##b", "[SEP]"], ["ab"]) == []


# Few distinct characters, so that words overlap, nest and repeat; tokens that are
# not one CJK character (subwords, [UNK], "##" + CJK, a two-character CJK token),
# and words holding non-CJK characters, including the NUL that token characters use.
_CJK = list("中国人民大学\U00020000")  # and one CJK character outside the BMP
_TOKEN = st.one_of(st.sampled_from(_CJK), st.sampled_from(["[UNK]", "ok", "##中", "中国", "1", "\x00"]))
_WORD = st.one_of(st.lists(st.sampled_from(_CJK), min_size=1, max_size=5).map("".join),
                  st.sampled_from(["", "中\x00国", "ok", "中ok", "\x00", "##中", "国\x01"]))


def test_a_short_word_after_two_longer_candidates_that_fail():
    """Found by the property test below: pyahocorasick's iter_long matched nothing here."""
    tokens = ["[CLS]", "中", "中", "中", "国", "[SEP]"]
    for words in (["中中国国", "中中中国国", "中国"], ["中中国[SEP]", "中中中国[SEP]", "中国"]):
        assert whole_word_ref(tokens, words) == reference_ref(tokens, words) == [4]


@settings(max_examples=3000, deadline=None)
@given(tokens=st.lists(_TOKEN, max_size=24), words=st.lists(_WORD, max_size=6), data=st.data())
def test_matching_equals_the_reference_scan(tokens, words, data):
    tokens = ["[CLS]", *tokens, "[SEP]"]
    # plus words cut from the line itself, so that long, nested and overlapping matches are common
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(tokens) - 1))
        words.append("".join(tokens[i : i + data.draw(st.integers(1, 6))]))
    assert whole_word_ref(tokens, words) == reference_ref(tokens, words)


@pytest.fixture(scope="module", params=["jieba", "ltp"])
def segmenter(request, ltp_dir):
    return make_segmenter(request.param, ltp_dir)


def test_identical_to_reference_on_real_text(segmenter, tokenizer, vocab_dir, ltp_dir, real_lines, tmp_path):
    lines = [x.strip() for x in real_lines if x.strip()]
    expected = reference_prepare_ref(lines, segmenter.segment, tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = RefSpec(str(vocab_dir), segmenter.name, str(ltp_dir))
    stats = write_ref_file(spec, corpus, tmp_path / "ref.txt", num_workers=2, block_lines=300, progress=False)
    ours = [json.loads(x) for x in iter_lines(tmp_path / "ref.txt")]
    assert stats.lines == len(ours) == len(lines)
    lengths = [len(x) for x in tokenizer(lines)["input_ids"]]
    compared = [i for i, n in enumerate(lengths) if n <= 512]
    assert len(compared) > 0.95 * len(lines)
    assert [ours[i] for i in compared] == [expected[i] for i in compared]
    assert sum(len(r) for r in ours) > 5 * len(lines)  # real words were found
    for i in set(range(len(lines))) - set(compared):  # long lines: the full ref, no truncation
        assert ours[i][: len(expected[i])] == expected[i] or max(ours[i]) > 511


def test_repeated_lines_are_segmented_once_across_workers(vocab_dir, ltp_dir, real_lines, tmp_path):
    # Repeats far apart (other blocks, so other workers), with other surrounding
    # whitespace, and blank lines: every distinct line is segmented once and every
    # copy gets the same ref as a one-process run.
    lines = [x.strip() for x in real_lines[:400] if x.strip()]
    corpus_lines = lines + [f"  {x}\t" for x in reversed(lines)] + ["", "   "] + lines[::3]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    spec = RefSpec(str(vocab_dir), "ltp", str(ltp_dir))
    one = write_ref_file(spec, corpus, tmp_path / "one.txt", num_workers=1, progress=False)
    two = write_ref_file(spec, corpus, tmp_path / "two.txt", num_workers=2, block_lines=37, progress=False)
    assert (tmp_path / "two.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()
    assert one.lines == two.lines == len(corpus_lines)
    assert one.segmented == two.segmented == len(set(lines))
    refs = [json.loads(x) for x in iter_lines(tmp_path / "two.txt")]
    n = len(lines)
    assert refs[:n] == refs[n : 2 * n][::-1] and refs[2 * n : 2 * n + 2] == [[], []]
    assert sum(map(len, refs)) > 5 * n
    # a memory bound far below the corpus: repeats are segmented again, refs unchanged
    with RefWriter(spec, num_workers=2, block_lines=37, progress=False, memo_size=50) as writer:
        small = writer.write(corpus, tmp_path / "small.txt")
    assert (tmp_path / "small.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()
    assert small.segmented > len(set(lines))


def test_long_line_gets_full_ref(tokenizer):
    jieba = make_segmenter("jieba")
    builder = RefBuilder(LineTokenizer(tokenizer), jieba)
    line = "我们喜欢自然语言处理。" * 10_000  # 110,000 characters, 110,002 tokens
    (ref,) = builder.refs([line])
    tokens = tokenizer(line)
    assert len(tokens["input_ids"]) == 110_002
    expected = reference_ref(tokenizer.convert_ids_to_tokens(tokens["input_ids"]), jieba.segment([line])[0])
    assert ref == expected and ref[-1] == 109_999  # ...处理。: 理 at 11 * 9,999 + 10


def cli_refs(tmp_path, content: bytes, *extra, check=True):
    corpus = tmp_path / "in.txt"
    corpus.write_bytes(content)
    out = tmp_path / "out_ref.txt"
    proc = run_script("pretraining/run_chinese_ref.py", "--input", corpus, "--output", out,
                      "--tokenizer", tmp_path / "vocab", *extra, check=check)
    return proc, out


@pytest.fixture
def work(tmp_path, vocab_dir):
    (tmp_path / "vocab").symlink_to(vocab_dir)
    return tmp_path


def test_cli_bad_and_odd_lines(work, tokenizer):
    lines = ["自然语言处理", "", "   ", "\u3000", "中文\u2028分词\u0085很好\x0b真的\x0c", "English words, 数字123, "
             "emoji😀和全角，标点！ＡＢＣ", "长句子很长。" * 20_000, "最后一行"]
    proc, out = cli_refs(work, ("\n".join(lines[:5]) + "\r\n" + "\n".join(lines[5:])).encode(), "--segmenter", "jieba")
    refs = [json.loads(x) for x in iter_lines(out)]
    assert len(refs) == len(lines) == 8  # one per line: blank lines and U+2028/U+0085 inside lines
    assert refs[1] == refs[2] == refs[3] == []
    jieba = make_segmenter("jieba")
    for line, ref in zip(lines, refs):
        if line.strip():
            ids = tokenizer(line.strip())["input_ids"]
            assert ref == reference_ref(tokenizer.convert_ids_to_tokens(ids), jieba.segment([line.strip()])[0])
    assert refs[0] == [2, 3, 4, 6] and len(refs[6]) > 20_000 and max(refs[6]) > 100_000
    assert "8 lines" in proc.stdout


def test_cli_invalid_utf8(work):
    proc, out = cli_refs(work, "好的\n".encode() + b"\xc3\x28 bad\n", "--segmenter", "jieba", check=False)
    assert proc.returncode == 2 and "in.txt:2: invalid UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc, out = cli_refs(work, "好的\n".encode() + b"\xc3\x28 bad\n", "--segmenter", "jieba",
                         "--encoding_errors", "replace")
    assert len(list(iter_lines(out))) == 2


def test_cli_empty_file(work):
    proc, out = cli_refs(work, b"", "--segmenter", "jieba")
    assert out.read_bytes() == b""


def test_cli_missing_inputs(work, ltp_dir):
    corpus = work / "c.txt"
    corpus.write_text("中文\n", encoding="utf-8")
    for args, message in [
        (["--input", work / "nope.txt", "--output", work / "o.txt", "--tokenizer", work / "vocab"], "not found"),
        (["--input", corpus, "--output", work / "o.txt", "--tokenizer", work / "no_vocab", "--segmenter", "jieba"],
         "tokenizer folder not found"),
        (["--input", corpus, "--output", work / "o.txt", "--tokenizer", work / "vocab", "--segmenter", "ltp",
          "--ltp_model", work / "no_ltp"], "LTP model folder not found"),
    ]:
        proc = run_script("pretraining/run_chinese_ref.py", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (work / "o.txt").exists()


def test_cli_from_inside_pretraining_with_bert_alias_and_folders(work, ltp_dir):
    src = work / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("今天天气很好\n我们去公园散步\n", encoding="utf-8")
    (src / "b.txt").write_text("人民日报发表社论\n", encoding="utf-8")
    run_script("pretraining/run_chinese_ref.py", "--input", src, "--output", work / "refs", "--bert", work / "vocab",
               "--segmenter", "ltp", "--ltp_model", ltp_dir, "--num_workers", "1", cwd=ROOT / "pretraining")
    assert len(list(iter_lines(work / "refs" / "a_ref.txt"))) == 2
    assert len(list(iter_lines(work / "refs" / "b_ref.txt"))) == 1


def test_cli_without_arguments_explains_miniRBT_layout():
    if (ROOT / "dataset" / "train" / "train_files").exists():
        pytest.fail("tests expect no dataset/ folder in the checkout")
    proc = run_script("pretraining/run_chinese_ref.py", check=False)
    assert proc.returncode == 2 and "dataset/train/train_files" in proc.stderr


def test_interrupted_run_leaves_no_output(work):
    from minirbt.corpus import peoples_daily_sentences

    corpus = work / "big.txt"
    text = peoples_daily_sentences()
    corpus.write_text("".join(f"{text[i % len(text)]}{i}\n" for i in range(200_000)), encoding="utf-8")
    out = work / "big_ref.txt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretraining/run_chinese_ref.py"), "--input", str(corpus),
                             "--output", str(out), "--tokenizer", str(work / "vocab"), "--segmenter", "jieba"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some refs are on disk under the temporary name
        partial = [p for p in work.iterdir() if p.name.startswith(".big_ref.txt.tmp-") and p.stat().st_size > 0]
        if partial or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "finished too early to test an interruption"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only a hidden .tmp- file may remain, never big_ref.txt
    assert [p.name for p in work.iterdir() if p.name.startswith("big_ref")] == []


def test_refbuilder_rejects_bad_segmenter(tokenizer):
    class Broken:
        name = "broken"

        def segment(self, lines):
            return [[]]

    with pytest.raises(RuntimeError, match="segmenter returned 1 results for 2 lines"):
        RefBuilder(LineTokenizer(tokenizer), Broken()).refs(["一", "二"])


def test_unknown_segmenter():
    with pytest.raises(CorpusError, match="unknown segmenter"):
        make_segmenter("thulac")


def test_blocks_shrink_towards_the_end_and_keep_every_line(tmp_path):
    lines = [f"第{i}行" for i in range(10_000)]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    blocks = list(_blocks(path, 1000, "strict", total=len(lines), workers=2))
    sizes = [len(b) for b in blocks]
    assert [x for b in blocks for x in b] == lines  # nothing lost, reordered or repeated
    assert sizes[0] == max(sizes) == 1000 and sizes == sorted(sizes, reverse=True)
    assert sizes[-2] <= 250  # the last blocks are small: no worker is left alone with a big one
    assert [len(b) for b in _blocks(path, 1000, "strict")] == [1000] * 10  # total unknown: fixed size
