"""Background tasks an API process owns: started in the lifespan, cancelled at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Generic, TypeVar

Item = TypeVar("Item")


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel the task and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Coalescer(Generic[Item]):
    """Hands a background task every item waiting when its previous batch ends.

    A lone item goes straight through; under load the items that arrive while a batch is in
    flight form the next one, so round trips per item fall as the rate rises.
    """

    max_batch = 256

    def __init__(self, name: str) -> None:
        self._name = name
        self._pending: list[Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        await cancel(self._task)

    def _add(self, item: Item) -> None:
        self._pending.append(item)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                size = self.max_batch
                batch, self._pending = self._pending[:size], self._pending[size:]
                await self._handle(batch)

    async def _handle(self, batch: list[Item]) -> None:
        raise NotImplementedError
