"""One heartbeat per worker process keeps the leases of all its running jobs alive.

A job's lease must outlive slow first tokens and retry back-offs as well as steady token
flow, and must lapse when the process dies: a thread that renews every held claim in one
UPDATE does both, and nothing is added to the per-token path.
"""

from __future__ import annotations

import logging
import threading
import uuid

from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from inferq import lifecycle
from inferq.models import Job, JobStatus

log = logging.getLogger("inferq.worker")


class LeaseKeeper:
    def __init__(self, sessions: sessionmaker, lease_seconds: float) -> None:
        self._sessions = sessions
        self._lease_seconds = lease_seconds
        self._held: set[uuid.UUID] = set()  # claim tokens
        self._lost: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inferq-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def hold(self, token: uuid.UUID) -> None:
        with self._lock:
            self._held.add(token)

    def release(self, token: uuid.UUID) -> None:
        with self._lock:
            self._held.discard(token)
            self._lost.discard(token)

    def lost(self, token: uuid.UUID) -> bool:
        """True once a renewal found the claim gone (its lease expired and was taken over)."""
        return token in self._lost

    def renew(self) -> None:
        with self._lock:
            held = list(self._held)
        if not held:
            return
        with self._sessions.begin() as session:
            kept = set(
                session.scalars(
                    update(Job)
                    .where(Job.claim_token.in_(held), Job.status == JobStatus.running)
                    .values(lease_expires_at=lifecycle.lease_until(self._lease_seconds))
                    .returning(Job.claim_token)
                ).all()
            )
        with self._lock:
            self._lost |= {t for t in held if t not in kept and t in self._held}

    def _loop(self) -> None:
        while not self._stop.wait(self._lease_seconds / 3):
            try:
                self.renew()
            except Exception:
                log.exception("lease renewal failed; retrying")
