"""The one way a response learns that its client left: a task that waits for the disconnect.

Streaming and long-poll responses run their work inside a `DisconnectWatcher`. When the ASGI
server reports `http.disconnect`, the watcher cancels the task doing the work, and the block
ends quietly with `gone` set, so that the caller can act on it (cancel the job of a reply
nobody will read). One task per response, and nothing per event or per send.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive


class DisconnectWatcher:
    """Ends the block it guards when the client disconnects; `gone` says whether it did."""

    __slots__ = ("_inside", "_owner", "_receive", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._owner: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._inside = False
        self.gone = False

    async def __aenter__(self) -> DisconnectWatcher:
        self._owner = asyncio.current_task()
        self._inside = True
        self._watcher = asyncio.create_task(self._watch())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        # Before any await: from here on the watcher must not cancel the caller.
        self._inside = False
        assert self._watcher is not None and self._owner is not None
        self._watcher.cancel()
        if not (self.gone and kind is not None and issubclass(kind, asyncio.CancelledError)):
            return False
        # Our own cancellation ends the block quietly; one from elsewhere as well goes on.
        return self._owner.uncancel() == 0

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        # The caller is suspended inside the block (this task runs only while it waits), so
        # the cancellation lands at the await it is in, never after the block.
        if self._inside:
            self.gone = True
            assert self._owner is not None
            self._owner.cancel()
