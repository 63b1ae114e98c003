"""Model arguments take Hugging Face model ids, resolved offline from an HF cache built here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from minirbt.modeling import resolve_model
from minirbt.textio import CorpusError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, tiny_teacher, monkeypatch):
    """An HF cache holding 'minirbt-test/tiny-teacher' (the layout huggingface_hub reads: refs/main -> snapshot)."""
    repo = tmp_path / "hub" / "models--minirbt-test--tiny-teacher"
    shutil.copytree(tiny_teacher, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_model_ids_resolve_from_the_cache_offline(hub_cache, tmp_path):
    folder = resolve_model("minirbt-test/tiny-teacher", "--teacher")
    assert folder.endswith(COMMIT) and (tmp_path / "hub").as_posix() in folder
    assert resolve_model(str(tmp_path), "--teacher") == str(tmp_path)  # a local folder stays itself
    with pytest.raises(CorpusError, match=r"--teacher minirbt-test/absent: no such folder here, and the Hugging "
                                          r"Face model minirbt-test/absent could not be fetched"):
        resolve_model("minirbt-test/absent", "--teacher")
    # the CLI with a model id: the teacher assistant is built from the cached snapshot
    out = tmp_path / "ta"
    cfg = ROOT / "minirbt" / "configs" / "rbt6.json"
    import json

    small = json.loads(cfg.read_text()) | {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                           "intermediate_size": 128}
    (tmp_path / "s.json").write_text(json.dumps(small))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/init_checkpoint_TA.py"), "--teacher",
                           "minirbt-test/tiny-teacher", "--student_config", str(tmp_path / "s.json"), "--output",
                           str(out)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()


def test_the_package_does_not_force_offline_mode():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run([sys.executable, "-c", "import os, minirbt, minirbt.trainer; "
                           "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_DATASETS_OFFLINE'))"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.stdout.split() == ["None", "None"], proc.stderr
