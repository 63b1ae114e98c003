"""The README's main job, on the embedded default, in its quick mode."""

from __future__ import annotations

from conftest import run_script

from minirbt.data import load_pretraining_dataset


def test_demo_quick_runs_and_resumes(tmp_path):
    out = tmp_path / "demo"
    proc = run_script("scripts/demo.py", "--quick", "--output_dir", out)
    assert "1. whole-word-mask refs (jieba)" in proc.stdout and "tokens chosen" in proc.stdout
    ds = load_pretraining_dataset(out / "dataset_jieba_128")
    assert len(ds["train"]) > 500 and len(ds["validation"]) > 10
    again = run_script("scripts/demo.py", "--quick", "--output_dir", out)
    assert "done, skipped" in again.stdout and "up to date, reused" in again.stdout
