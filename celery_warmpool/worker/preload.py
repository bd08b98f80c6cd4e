"""What every agent of a pool on a node shares: ``Agent.preload``, run once per node.

Under prefork it runs in the worker's main process before the children fork: they then
share its memory (a model's weights) instead of each loading a copy, replacement children
included. Then ``gc.collect(); gc.freeze()``: without it, the garbage collector of each
child writes to every object's header, and the pages holding them stop being shared (a
real sentence-embedding model measured 729 MB for two children and their parent without
the freeze, 515 MB with it). Under threads, gevent and solo it runs once in the process.

A model on a GPU cannot cross a fork: a ``preload`` that leaves CUDA initialized in a
prefork main process is refused, with what to do instead.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

from ..core.errors import ConfigurationError, PoolStartError
from ..core.spec import PoolSpec

__all__ = ["cuda_initialized", "preload"]

logger = logging.getLogger(__name__)


def preload(specs: Iterable[PoolSpec], before_fork: bool) -> dict[str, Any]:
    """Run each pool's ``preload`` once; return what each pool's agents share, by pool.

    Raises:
        PoolStartError: a ``preload`` raised; the message names the pool.
        ConfigurationError: under prefork (``before_fork``), a ``preload`` left CUDA
            initialized.
    """
    shared: dict[str, Any] = {}
    for spec in specs:
        started = time.perf_counter()
        try:
            shared[spec.name] = spec.agent.preload(dict(spec.worker_opts or {}))
        except Exception as exc:
            raise PoolStartError(
                f"pool {spec.name!r}: {spec.agent.__name__}.preload() failed, so the worker "
                f"cannot start: {type(exc).__name__}: {exc}", spec.name,
                f"{type(exc).__name__}: {exc}") from exc
        if shared[spec.name] is not None:
            logger.info("warm pools: pool %r preloaded in %.2fs", spec.name,
                        time.perf_counter() - started)
        if before_fork and cuda_initialized():
            raise ConfigurationError(
                f"pool {spec.name!r}: {spec.agent.__name__}.preload() initialized CUDA in the "
                "worker's main process, and CUDA cannot cross a fork into the prefork "
                "children. Load the model onto the GPU in setup() instead (self.process_index "
                "tells a child which device to take), or run the worker with -P threads or "
                "-P solo.", spec.name, "preload")
    if before_fork and any(value is not None for value in shared.values()):
        # Collected, then frozen, so that no child's collector touches these objects.
        gc.collect()
        gc.freeze()
    return shared


def cuda_initialized() -> bool:
    """Whether this process has initialized CUDA (torch's, if torch is loaded)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None:
        return False
    checks = (getattr(cuda, "is_initialized", None), getattr(cuda, "_is_in_bad_fork", None))
    return any(callable(check) and bool(check()) for check in checks)
