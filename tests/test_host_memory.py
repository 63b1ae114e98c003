"""glibc keeps what a training step frees (minirbt.host_memory): the next step touches no fresh pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEPS = r"""
import json, resource, torch
from minirbt.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory()
def step():  # a step's worth of activations, 1-24 MB each, made and freed
    xs = [torch.ones(int(n)) for n in (5e6, 2e6, 6e6, 1e6, 3e5, 4e6)]
    ys = [x * 2 for x in xs]
    del xs
    return sum(float(y[0]) for y in ys)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_kept_memory_spares_the_page_faults_and_the_user_can_opt_out():
    kept, stock = _run(), _run(MINIRBT_KEEP_HOST_MEMORY="0")
    assert kept["applied"] and not stock["applied"]
    # 20 steps of ~74 MB each: stock glibc unmaps and re-faults most of it (~700,000 faults measured here)
    assert stock["faults"] > 100_000 and kept["faults"] * 10 < stock["faults"], (kept, stock)
    assert not _run(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["applied"]  # the user's tunables win
