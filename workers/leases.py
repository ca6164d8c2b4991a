"""One heartbeat per worker process keeps the leases of its running jobs alive while they move.

A job's lease must outlive slow first tokens and retry back-offs as well as steady token
flow, and must lapse when the process dies: a thread that renews every held claim in one
UPDATE does both, and adds to the per-token path only a clock reading.

It must also lapse when the process lives but the generation does not move: a backend that
holds the connection open with keep-alives and sends nothing (the client's read timeout never
fires) would otherwise keep the job forever. So only a claim that made progress (a token, a
flush, a retry's back-off under way) within `stall_seconds` is renewed; a stalled one lapses
and the sweeper enqueues the job again, while the stream's fencing keeps the stalled thread
from writing should it ever wake up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from sqlalchemy.orm import sessionmaker

from inferq import lifecycle

log = logging.getLogger("inferq.worker")


class LeaseKeeper:
    def __init__(
        self, sessions: sessionmaker, lease_seconds: float, stall_seconds: float = 90.0
    ) -> None:
        self._sessions = sessions
        self._lease_seconds = lease_seconds
        self._stall_seconds = stall_seconds
        # Claim token -> when it last moved (time.monotonic(); later while a back-off runs).
        # Written without the lock from the generation's thread: one dict store, atomic.
        self._moved: dict[uuid.UUID, float] = {}
        self._jobs: dict[uuid.UUID, str] = {}  # claim token -> job id, for the log
        self._lost: set[uuid.UUID] = set()
        self._stalled: set[uuid.UUID] = set()  # reported once each
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inferq-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def hold(self, token: uuid.UUID, job_id: str = "") -> None:
        with self._lock:
            self._moved[token] = time.monotonic()
            self._jobs[token] = job_id

    def release(self, token: uuid.UUID) -> None:
        with self._lock:
            self._moved.pop(token, None)
            self._jobs.pop(token, None)
            self._lost.discard(token)
            self._stalled.discard(token)

    def lost(self, token: uuid.UUID) -> bool:
        """True once a renewal found the claim gone (its lease expired and was taken over)."""
        return token in self._lost

    def beat(self, token: uuid.UUID, grace: float = 0.0, now: float | None = None) -> bool:
        """Record progress on a held claim (`grace`: seconds of waiting that count as progress,
        e.g. a retry's back-off; `now`: the caller's time.monotonic()); False once the claim
        was lost."""
        if token in self._moved:
            self._moved[token] = (time.monotonic() if now is None else now) + grace
        return token not in self._lost

    def renew(self) -> None:
        held, stalled = self._moving()
        for token in stalled:
            log.warning(
                "no progress for %.0fs: letting the lease lapse",
                self._stall_seconds,
                extra={"job_id": self._jobs.get(token, ""), "claim": str(token)},
            )
        if not held:
            return
        with self._sessions.begin() as session:
            kept = lifecycle.renew(session.connection(), held, self._lease_seconds)
        with self._lock:
            self._lost |= {t for t in held if t not in kept and t in self._moved}

    def _moving(self) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """The claims to renew, and those newly found stalled."""
        floor = time.monotonic() - self._stall_seconds
        with self._lock:
            moved = dict(self._moved)
            stalled = {t for t, at in moved.items() if at < floor}
            newly = stalled - self._stalled
            # A stalled claim that moves again is renewed again (if nobody took it meanwhile).
            self._stalled = stalled
        return [t for t in moved if t not in stalled], sorted(newly)

    def _loop(self) -> None:
        while not self._stop.wait(self._lease_seconds / 3):
            try:
                self.renew()
            except Exception:
                log.exception("lease renewal failed; retrying")
