"""Group admission: the limit scripts of concurrent submits share one Redis round trip.

A key with limits costs its submit one script run (inferq.limits). Alone, a submit's script
goes straight out; under load, the scripts of the submits that arrive while one pipeline is
in flight form the next, as the submit batcher does for INSERTs. Each script still runs on
its own in Redis, atomically, in arrival order: only the round trips are shared.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from api import tasks
from inferq.limits import ADMIT_SCRIPT

ADMIT_SHA = hashlib.sha1(ADMIT_SCRIPT.encode()).hexdigest()  # Redis names scripts by it


@dataclass(slots=True)
class _Pending:
    reservation: str
    args: list[Any]
    done: asyncio.Future[list[Any]]


class Admissions(tasks.Coalescer[_Pending]):
    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__("inferq-admissions")
        self._redis = redis

    async def admit(self, reservation: str, args: list[Any]) -> list[Any]:
        """The admission script's answer for this reservation."""
        pending = _Pending(reservation, args, asyncio.get_running_loop().create_future())
        self._add(pending)
        return await pending.done

    async def _handle(self, batch: list[_Pending]) -> None:
        try:
            answers = await self._scripts(batch)
        except Exception as exc:  # Redis down: every submit of the batch gets its 503
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            return
        for pending, answer in zip(batch, answers, strict=True):
            if pending.done.done():
                continue
            if isinstance(answer, Exception):
                pending.done.set_exception(answer)
            else:
                pending.done.set_result(list(answer))

    async def _scripts(self, batch: list[_Pending]) -> list[Any]:
        # EVALSHA by a digest computed once; the first batch after a Redis restart finds
        # the script gone and runs those it lacked with EVAL, which loads it again.
        answers = await self._pipeline(batch, lambda pipe, p: pipe.evalsha(ADMIT_SHA, 1, *p))
        missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if missing:
            again = await self._pipeline(
                [batch[i] for i in missing], lambda pipe, p: pipe.eval(ADMIT_SCRIPT, 1, *p)
            )
            for i, answer in zip(missing, again, strict=True):
                answers[i] = answer
        return answers

    async def _pipeline(self, batch: list[_Pending], command: Any) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for pending in batch:
                command(pipe, (pending.reservation, *pending.args))
            return list(await pipe.execute(raise_on_error=False))
