"""Random ids for signals and calls, cheaply.

``uuid.uuid4()`` asks the operating system for 16 random bytes on every call: a system
call per id, and a caller makes two ids per call (its signal's and its task's). These ids
only need to be unique, not secret, so they come from a generator seeded once per process
from the operating system (and seeded again in a forked child, which would otherwise
repeat its parent's ids).
"""

from __future__ import annotations

import os
import random
import uuid

__all__ = ["new_id"]

_random = random.Random()


def new_id() -> str:
    """A random (version 4) UUID, as text."""
    return str(uuid.UUID(int=_random.getrandbits(128), version=4))


def _reseed() -> None:
    _random.seed(os.urandom(32))


_reseed()
os.register_at_fork(after_in_child=_reseed)
