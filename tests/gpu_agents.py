"""An agent placed on a GPU by its pool's ``devices``, for tests on machines without one.

Importing this module patches torch's lazy CUDA initialisation (``torch.cuda._lazy_init``,
which every first CUDA call goes through) to write the calling process's pid to the file
``WARMPOOL_TEST_CUDA_LOG`` before it goes on (and, with torch's CPU build, fails). A
worker imports it in its main process, before the fork, so the record shows which
processes tried to initialise CUDA: the children, never the parent. Each agent's
``setup()`` writes ``<pid> <process_index> <seat> <device>`` to
``WARMPOOL_TEST_DEVICE_LOG`` and tries to move its copy of the preloaded model to its
device, as a real one would.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch

from celery_warmpool import Agent, AgentState

_initialise = torch.cuda._lazy_init


def _recorded_initialise() -> None:
    log = os.environ.get("WARMPOOL_TEST_CUDA_LOG")
    if log:
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
    _initialise()


torch.cuda._lazy_init = _recorded_initialise


class GpuAgent(Agent[AgentState]):
    """A small torch model: read once per node on the CPU, then put on each agent's
    device in the process that serves."""

    @classmethod
    def preload(cls, options: Any) -> Any:
        torch.set_num_threads(1)  # before any tensor op: forked children must not hang
        return torch.nn.Linear(8, 8)  # on the CPU: the parent never touches CUDA

    def setup(self) -> None:
        self.model = copy.deepcopy(self.shared)
        # No CUDA on this machine (torch's CPU build raises): the model stays on the CPU.
        with contextlib.suppress(AssertionError, RuntimeError):
            self.model = self.model.to(self.device or "cpu")
        log = os.environ.get("WARMPOOL_TEST_DEVICE_LOG")
        if log:  # written last: once it is there, the CUDA log says all it will
            with open(log, "a") as file:
                file.write(f"{os.getpid()} {self.process_index} {self.seat} {self.device}\n")
