"""The one definition of a corpus line, and all-or-nothing file writes."""

from __future__ import annotations

import os

import pytest

from minirbt.textio import CorpusError, atomic_path, count_lines, iter_lines


def write(tmp_path, data: bytes):
    p = tmp_path / "c.txt"
    p.write_bytes(data)
    return p


def test_lines_split_on_newline_only(tmp_path):
    text = "甲\u2028乙\n丙\u0085丁\r\n戊\x0b己\x0c庚\u2029辛\n\n  \nlast"
    p = write(tmp_path, text.encode())
    lines = list(iter_lines(p))
    assert lines == ["甲\u2028乙", "丙\u0085丁", "戊\x0b己\x0c庚\u2029辛", "", "  ", "last"]
    assert count_lines(p) == len(lines) == 6


def test_final_newline_ends_last_line(tmp_path):
    assert list(iter_lines(write(tmp_path, b"a\nb\n"))) == ["a", "b"]
    assert count_lines(tmp_path / "c.txt") == 2
    assert list(iter_lines(write(tmp_path, b""))) == []
    assert count_lines(tmp_path / "c.txt") == 0
    assert list(iter_lines(write(tmp_path, b"\n"))) == [""]


def test_lines_across_read_blocks(tmp_path, monkeypatch):
    import minirbt.textio as textio

    monkeypatch.setattr(textio, "READ_BLOCK", 7)
    text = "\n".join(["中文行" * i for i in range(30)]) + "\r\n尾"
    p = write(tmp_path, text.encode())
    assert list(iter_lines(p)) == ["中文行" * i for i in range(30)] + ["尾"]
    assert count_lines(p) == 31


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = write(tmp_path, "好\n坏".encode() + b"\xff\xfe\n")
    with pytest.raises(CorpusError, match=r"c\.txt:2: invalid UTF-8"):
        list(iter_lines(p))
    assert list(iter_lines(p, errors="replace")) == ["好", "坏\ufffd\ufffd"]


def test_atomic_path_keeps_nothing_on_failure(tmp_path):
    final = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_text("complete")
    assert final.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_old_output_only_when_asked(tmp_path):
    final = tmp_path / "ds"
    final.mkdir()
    (final / "old").write_text("x")
    with pytest.raises(CorpusError, match="exists: refusing to replace it"), atomic_path(final, is_dir=True):
        pass
    assert [p.name for p in final.iterdir()] == ["old"]
    with atomic_path(final, is_dir=True, replace=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
