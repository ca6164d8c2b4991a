"""Jobs: create (idempotently), read within a tenant, list, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.auth import Principal
from api.errors import Conflict, InvalidRequest, NotFound, redact_addresses
from api.events.service import JobEvents
from api.jobs.schemas import ErrorInfo, JobCreate, JobOut, Links, Usage
from api.limits import Gate
from api.state import AppState
from api.webhooks.service import guard_url
from inferq import lifecycle, limits
from inferq.db import uuid7
from inferq.events import Progress, cancel_key, from_entries, progress, publish_end, stream_key
from inferq.lifecycle import Outcome
from inferq.metrics import JOBS_SUBMITTED
from inferq.models import Job, JobStatus
from inferq.protocol import ChatMessage, JobInput, JobParams
from inferq.queue import ENQUEUED_KEY
from inferq.registry import ModelSpec, Registry
from inferq.settings import Settings
from inferq.webhooks import job_timings

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Created:
    job: Job
    replayed: bool  # an earlier request with the same Idempotency-Key made it
    enqueued: bool = False


def resolve_model(registry: Registry, name: str) -> ModelSpec:
    spec = registry.get(name)
    if spec is None:
        raise InvalidRequest(
            f"unknown model {name!r}; available: {', '.join(sorted(registry.names()))}"
        )
    return spec


def check_size(body: JobCreate, settings: Settings) -> None:
    size = len(body.prompt or "") + sum(len(m.content) for m in body.messages or [])
    if size > settings.max_prompt_chars:
        raise InvalidRequest(
            f"input is {size} characters; the limit is {settings.max_prompt_chars}"
        )
    if body.messages is not None and len(body.messages) > settings.max_messages:
        raise InvalidRequest(f"at most {settings.max_messages} messages")
    if len(json.dumps(body.metadata)) > 16_384:
        raise InvalidRequest("metadata is larger than 16 KiB")


def job_values(body: JobCreate, spec: ModelSpec, key: Principal) -> dict[str, Any]:
    requested = body.max_tokens or DEFAULT_MAX_TOKENS
    params = JobParams(
        max_tokens=min(requested, spec.max_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
        cache=body.cache,
    )
    if body.prompt is not None:
        job_input = JobInput(prompt=body.prompt)
    else:
        messages = [ChatMessage(role=m.role, content=m.content) for m in body.messages or []]
        job_input = JobInput(messages=messages)
    return {
        "id": uuid7(),
        "tenant": key.tenant,
        "api_key_id": key.key_id,
        "requested_model": body.model,
        "model": spec.name,
        "status": JobStatus.queued.value,
        "priority": body.priority,
        "input": job_input.stored(),
        "params": params.model_dump(),
        "webhook": body.webhook.model_dump(mode="json") if body.webhook else None,
        "metadata_": body.metadata,
        "deadline_at": None
        if body.deadline_seconds is None
        else datetime.now(UTC) + timedelta(seconds=body.deadline_seconds),
    }


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_job(
    session: AsyncSession,
    state: AppState,
    key: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    digest: str | None = None,
    gate: Gate | None = None,
) -> Created:
    """`digest` is the request's hash when the caller hashes what it was sent (the OpenAI
    routes do); by default it is the hash of `body`. `gate` applies the key's limits."""
    check_size(body, state.settings)
    if body.webhook is not None:
        await guard_url(str(body.webhook.url), state.settings)
    spec = resolve_model(state.registry, body.model)
    values = job_values(body, spec, key)
    # Reserved under the job's id; the job's end settles it.
    reserved = gate is not None and await gate.admit(spec, values)
    try:
        created = await _insert(session, state, key, body, values, idempotency_key, digest)
    except Exception:  # not a cancelled request: the batcher may still make its job
        if reserved and gate is not None:
            await gate.release(values["id"])
        raise
    if reserved and gate is not None and created.replayed:
        await gate.release(values["id"])  # the earlier request's job holds its own
    return created


async def _insert(
    session: AsyncSession,
    state: AppState,
    key: Principal,
    body: JobCreate,
    values: dict[str, Any],
    idempotency_key: str | None,
    digest: str | None,
) -> Created:
    if idempotency_key is None:
        values["request_hash"] = digest  # how a retry of this request can find the job
        # The batcher writes on a connection of its own: the request's session must hold
        # none meanwhile, or a burst of submits takes the whole pool and waits for itself.
        await session.commit()
        # Committed and enqueued by the batcher, together with concurrent submits.
        return Created(await state.batcher.submit(values), replayed=False, enqueued=True)
    digest = digest or request_hash(body)
    values |= {"idempotency_key": idempotency_key, "request_hash": digest}
    job = await session.scalar(
        insert(Job)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=["api_key_id", "idempotency_key"],
            index_where=Job.idempotency_key.is_not(None),
        )
        .returning(Job)
    )
    if job is not None:
        return Created(job, replayed=False)
    return Created(await _replay(session, key, idempotency_key, digest), replayed=True)


async def submit_job(
    session: AsyncSession,
    state: AppState,
    key: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    digest: str | None = None,
    gate: Gate | None = None,
) -> Created:
    """Create the job, commit it, then hand it to the broker (unless the batcher did both)."""
    created = await create_job(session, state, key, body, idempotency_key, digest, gate)
    await session.commit()
    if not created.replayed:
        if not created.enqueued:
            await state.queue.put([created.job])
        JOBS_SUBMITTED.labels(created.job.model).inc()
    return created


async def _replay(session: AsyncSession, key: Principal, idem: str, digest: str) -> Job:
    existing = await session.scalar(
        select(Job).where(
            Job.api_key_id.is_not_distinct_from(key.key_id), Job.idempotency_key == idem
        )
    )
    if existing is None:  # the other request's row is not visible yet
        raise Conflict("a request with this Idempotency-Key is still being processed")
    if existing.request_hash != digest:
        raise Conflict("this Idempotency-Key was used with a different request body")
    return existing


async def get_job(session: AsyncSession, key: Principal, job_id: uuid.UUID) -> Job:
    job = await session.scalar(select(Job).where(Job.id == job_id, Job.tenant == key.tenant))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


async def job_if_unseen(
    state: AppState, session: AsyncSession, key: Principal, job_id: uuid.UUID
) -> Job | None:
    """404 unless the job is this tenant's; the job row only if this process had to read it.

    A job's tenant never changes, so each process remembers it: the thousandth reader of a
    job's events costs no query.
    """
    tenant = state.job_tenants.get(job_id)
    if tenant is None:
        job = await get_job(session, key, job_id)
        state.job_tenants[job_id] = job.tenant
        return job
    if tenant != key.tenant:
        raise NotFound(f"no job {job_id}")
    return None


async def queue_position(session: AsyncSession, job: Job) -> int | None:
    if job.status != JobStatus.queued:
        return None
    ahead = await session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.status == JobStatus.queued, Job.model == job.model, Job.id < job.id)
    )
    return int(ahead or 0)


async def list_jobs(
    session: AsyncSession,
    key: Principal,
    status: JobStatus | None,
    cursor: uuid.UUID | None,
    limit: int,
) -> tuple[list[Job], str | None]:
    query = select(Job).where(Job.tenant == key.tenant).order_by(Job.id.desc()).limit(limit + 1)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        query = query.where(Job.id < cursor)
    jobs = list((await session.scalars(query)).all())
    next_cursor = str(jobs[limit - 1].id) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


async def cancel_job(
    session: AsyncSession, state: AppState, key: Principal, job_id: uuid.UUID
) -> Job:
    """Cancel a queued job at once; ask a running one's worker to stop and wait a little."""
    job = await get_job(session, key, job_id)
    if JobStatus(job.status).terminal:
        if job.status == JobStatus.cancelled:
            return job
        raise Conflict(f"job {job_id} already ended ({job.status})")
    jid = str(job_id)
    await state.redis.set(cancel_key(jid), "1", ex=state.settings.stream_ttl_seconds)
    cancelled = await lifecycle.cancel_queued(session, job_id)
    await session.commit()
    if cancelled is not None:
        await limits.settle_async(state.redis, jid)  # it never ran: it used nothing
        await _publish_end(state, cancelled)
        return cancelled
    await _wait_for_end(
        JobEvents(state.redis, state.hub, state.sessions, job_id, None),
        state.settings.cancel_wait_seconds,
    )
    return await _reread(session, job_id)


async def _publish_end(state: AppState, job: Job) -> None:
    job_id = str(job.id)
    events = Outcome.of_row(job).closing_events()
    await publish_end(state.publish_script, job_id, events, state.settings)
    await state.broker.zrem(ENQUEUED_KEY, job_id)


async def _wait_for_end(events: JobEvents, seconds: float) -> None:
    """Until the job's `done` or `error` event (the worker publishes it after its commit),
    for at most `seconds`; a job that goes on running is answered as it is."""
    try:
        async with asyncio.timeout(seconds):
            await events.start()
            while not events.ended:
                await events.next()
    except TimeoutError:
        pass
    finally:
        await events.close()


async def _reread(session: AsyncSession, job_id: uuid.UUID) -> Job:
    job = await session.scalar(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    )
    assert job is not None
    return job


async def running_progress(state: AppState, job: Job) -> Progress | None:
    """A running job's output so far, read from its event stream (None for other jobs)."""
    if job.status != JobStatus.running:
        return None
    return progress(from_entries(await state.redis.xrange(stream_key(str(job.id)))))


def to_out(job: Job, position: int | None = None, so_far: Progress | None = None) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    # Backends' and client libraries' messages can name hosts: not the tenant's business.
    message = redact_addresses(job.error_message or "")
    error = ErrorInfo(type=job.error_type, message=message) if job.error_type else None
    return JobOut(
        id=job.id,
        status=job.status,
        model=job.model,
        requested_model=job.requested_model,
        priority=job.priority,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        deadline_at=job.deadline_at,
        output=so_far.text if so_far else job.output,
        finish_reason=job.finish_reason,
        usage=Usage(
            input_tokens=job.input_tokens,
            output_tokens=so_far.tokens if so_far else job.output_tokens,
            cost_usd=float(job.cost_usd) if job.cost_usd is not None else None,
        ),
        timings=job_timings(job),
        error=error,
        cached=job.cached,
        attempts=job.attempts,
        queue_position=position,
        metadata=job.metadata_,
        links=Links(self=base, events=f"{base}/events", cancel=f"{base}/cancel"),
    )
