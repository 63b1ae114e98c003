"""Fault injection points for the reliability suite (off unless ``MINIRBT_FAULT`` is set).

``MINIRBT_FAULT=<point>:<n>:<kind>`` makes the n-th arrival at ``fault_point(<point>)``
in this process either ``kill`` itself with SIGKILL (a pre-empted job: no cleanup
runs) or fail with ``enospc`` (``OSError`` "No space left on device", as a full disk
raises it). Points: ``checkpoint.model`` (model files of a checkpoint written, its
training state not yet), ``checkpoint.state`` (both written, not yet renamed into
place), ``finetune.checkpoint`` (a fine-tuning epoch checkpoint half written), ``run.built`` (a pretraining
run's models, optimizer and data loaded on this rank, before the ranks wrap the student for DDP).
"""

from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    spec = os.environ.get("MINIRBT_FAULT")
    if not spec:
        return
    name, n, kind = (spec.split(":") + ["1", "kill"])[:3]
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(n):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        raise ValueError(f"MINIRBT_FAULT: unknown kind {kind!r} (kill or enospc)")
