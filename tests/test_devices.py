"""Which GPU a process takes, and the warning for bf16 on GPUs that emulate it: the CUDA side of the setup,
checked on the CPU with torch.cuda's answers replaced (CI has no GPU)."""

from __future__ import annotations

import pytest
import torch

from minirbt.cli import warn_emulated_bf16
from minirbt.distributed import Dist, cuda_index
from minirbt.textio import CorpusError


@pytest.fixture
def gpus(monkeypatch):
    """A node showing ``n`` GPUs."""
    def show(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return show


def test_one_process_takes_the_gpu_it_names(gpus):
    gpus(4)
    assert cuda_index("cuda:2", Dist()) == 2
    assert cuda_index("cuda", Dist()) == 0 and cuda_index(None, Dist()) == 0


def test_torchrun_ranks_take_their_local_gpu(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    # node 1 of 2: global ranks 4..7, local ranks 0..3
    assert [cuda_index("cuda", Dist(rank=4 + i, world=8, local_rank=i)) for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(CorpusError, match=r"--device cuda:1: under torchrun each process takes the GPU of its "
                                          r"LOCAL_RANK; pass --device cuda"):
        cuda_index("cuda:1", Dist(rank=1, world=2, local_rank=1))


def test_more_processes_than_gpus_on_a_node_is_refused(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(CorpusError, match=r"started 8 processes on this node but it shows 4 GPU\(s\): use "
                                          r"--nproc_per_node 4"):
        cuda_index("cuda", Dist(rank=5, world=8, local_rank=5))


def test_a_scheduler_showing_one_gpu_per_task_maps_every_rank_to_it(gpus):
    gpus(1)  # e.g. srun with one GPU per task: LOCAL_RANK may be anything, the task sees only its own GPU
    assert cuda_index("cuda", Dist(rank=5, world=8, local_rank=5)) == 0


@pytest.mark.parametrize("capability, warned", [((7, 0), True), ((7, 5), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_on_a_gpu_before_ampere_is_called_slow(monkeypatch, capsys, capability, warned):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    warn_emulated_bf16(torch.device("cuda", 0), bf16=True)
    err = capsys.readouterr().err
    expected = (f"--bf16 on Tesla V100-SXM2-32GB (compute capability {capability[0]}.{capability[1]} < 8.0) is "
                "emulated and slower than fp32")
    assert (expected in err) == warned and (err == "") != warned
    warn_emulated_bf16(torch.device("cuda", 0), bf16=False)
    warn_emulated_bf16(torch.device("cpu"), bf16=True)
    assert capsys.readouterr().err == ""
