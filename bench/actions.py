"""Actions the benchmarks' apps share."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Result


class Echo(Action):
    """Give the signal's ``value`` back (the state is left alone)."""

    name = "echo"

    class Params(BaseModel):
        value: Any = None

    def run(self, params: Any, context: ActionContext) -> Result:
        return Result(params.value)
