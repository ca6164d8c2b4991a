"""A job's events for one SSE client: subscribe, replay, then live, without gaps or repeats."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.events.hub import Hub, Inbox
from inferq.events import TERMINAL_EVENTS, Event, from_reply, parse_stream_id, stream_key
from inferq.lifecycle import Outcome
from inferq.models import Job, JobStatus
from inferq.protocol import ResetData, StatusData, TokenData
from inferq.resp import RespLink, pack

# A job without a stream (queued, most likely) has its row read at a quiet channel's wake-up
# no sooner than this after a read that found it going on; the wait doubles up to the most.
# A wake-up that says live events may have been lost reads it at once.
ROW_RECHECK_FIRST_S = 10.0
ROW_RECHECK_MAX_S = 60.0


class JobEvents:
    """Replays a job's stream after `after`, then follows it live until `done` or `error`.

    The stream is read on the process's lean Redis connection (`link`), live events come
    from the hub.
    """

    def __init__(
        self,
        link: RespLink,
        hub: Hub,
        sessions: async_sessionmaker,
        job_id: uuid.UUID,
        after: str | None,
        snapshot: Job | None = None,
    ) -> None:
        self.link = link
        self.hub = hub
        self.sessions = sessions
        self.job_id = job_id
        self.key = stream_key(str(job_id))
        self.last = after or "0-0"
        self._last_position = parse_stream_id(self.last)  # parsed once, compared per event
        self.ended = False
        self.snapshot = snapshot  # the job as the caller last read it, to spare a query
        self._subscription = contextlib.AsyncExitStack()
        self._live: Inbox | None = None
        self._row_due = 0.0  # no quiet wake-up reads the job's row before this (monotonic)
        self._row_wait = ROW_RECHECK_FIRST_S

    async def __aiter__(self) -> AsyncIterator[Event]:
        batches = self.batches()
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()  # unsubscribe now, not when the generator is collected

    async def batches(self) -> AsyncGenerator[list[Event]]:
        """The events in the groups they became available in (one write each).

        A live group can be empty: the hub wakes idle readers every few seconds, which lets
        a caller do periodic work (a keep-alive) without a timer of its own.
        """
        try:
            replayed = await self.start()
            if replayed:
                yield replayed
            while not self.ended:
                yield await self.next()
        finally:
            await self.close()

    # The same as start / next / close, for callers on the per-event path (the SSE route):
    # plain coroutines cost less per event than an async generator does.

    async def start(self) -> list[Event]:
        """Subscribe (confirmed), then return what the stream already holds after `after`."""
        self._live = await self._subscription.enter_async_context(
            self.hub.subscribe(str(self.job_id))
        )
        replayed, exists = await self._read_stream()
        if not replayed and not exists:
            replayed = [event async for event in self._from_database(initial=True)]
        elif not replayed and self.last != "0-0":
            self.ended = await self._ended_at_resume()
        return replayed

    async def _ended_at_resume(self) -> bool:
        """The client resumed exactly at the stream's last event, and that event ended it: it
        has everything (a browser's EventSource reconnects even after `done`, sending its id).
        Only that exact id: an id from another life of the stream says nothing of this one."""
        last = from_reply(
            await self.link.call("XREVRANGE", self.key, "+", "-", "COUNT", 1, retry=True)
        )
        return bool(last) and last[0].type in TERMINAL_EVENTS and last[0].id == self.last

    async def next(self) -> list[Event]:
        """The next live events; empty if the hub woke this reader with nothing new."""
        assert self._live is not None, "start() first"
        return await self._next_live(self._live)

    async def close(self) -> None:
        await self._subscription.aclose()

    def _accept(self, event: Event) -> bool:
        """Take an event only if it comes after the last one sent; remember the end."""
        if event.id:
            position = parse_stream_id(event.id)
            if position <= self._last_position:
                return False
            self.last, self._last_position = event.id, position
        if event.type in TERMINAL_EVENTS:
            self.ended = True
        return True

    async def _read_stream(self) -> tuple[list[Event], bool]:
        """The stream's events after the last one sent, and whether the stream exists: both
        in one round trip, as a new job's first read (nothing written yet) needs both."""
        start = "-" if self.last == "0-0" else f"({self.last}"
        commands = [pack(("XRANGE", self.key, start, "+")), pack(("EXISTS", self.key))]
        entries, exists = await self.link.run(commands, retry=True)
        events = from_reply(entries)
        return [e for e in events if not self.ended and self._accept(e)], bool(exists)

    async def _next_live(self, live: Inbox) -> list[Event]:
        batch = await live.take()
        # None: the hub says you fell behind, the channel went quiet, or Redis reconnected.
        # A process that is stopping reads no more: its readers resume elsewhere.
        if None in batch and not self.hub.draining:
            return await self._catch_up(lost=live.lost)
        return [e for e in batch if e is not None and not self.ended and self._accept(e)]

    async def _catch_up(self, lost: bool) -> list[Event]:
        caught_up, exists = await self._read_stream()
        if caught_up or exists:
            return caught_up
        # No stream: the job has not started, or it ended and its stream is gone (expired,
        # or lost with its closing events), which only its row tells. Every quiet wake-up
        # of every reader waiting for a queued job would read a row: read less often.
        if not lost and time.monotonic() < self._row_due:
            return []
        ended = [e async for e in self._from_database(initial=False)]
        if not ended:
            self._row_due = time.monotonic() + self._row_wait
            self._row_wait = min(2 * self._row_wait, ROW_RECHECK_MAX_S)
        return ended

    async def _from_database(self, initial: bool) -> AsyncIterator[Event]:
        """Without a Redis stream: a finished job is rebuilt from its row; else its status."""
        job = self.snapshot if initial else None
        if job is None:
            async with self.sessions() as session:
                job = await session.scalar(select(Job).where(Job.id == self.job_id))
        if job is None:
            return
        status = JobStatus(job.status)
        if not status.terminal:
            if initial:
                yield Event.of(StatusData(status=status))
            return
        if self.last != "0-0":
            # The client saw part of an attempt we can no longer place: start it over.
            yield Event.of(ResetData(attempt=job.attempts))
        if job.output:
            yield Event.of(TokenData(text=job.output))
        for event in Outcome.of_row(job).closing_events():
            self._accept(event)
            yield event
