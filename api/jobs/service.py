"""Jobs: create (idempotently), read within a tenant, list, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.auth import Principal
from api.errors import Conflict, InvalidRequest, NotFound, redact_addresses
from api.events.service import JobEvents
from api.jobs.context import fit_context
from api.jobs.schemas import (
    ErrorInfo,
    EvaluationInfo,
    FeedbackCreate,
    FeedbackInfo,
    FeedbackOut,
    JobCreate,
    JobOut,
    Links,
    Usage,
)
from api.limits import Gate
from api.state import AppState
from api.webhooks.service import guard_url
from inferq import cache, lifecycle, limits
from inferq.db import uuid7
from inferq.events import (
    Event,
    Progress,
    cancel_key,
    from_reply,
    progress,
    publish_end,
    stream_key,
)
from inferq.lifecycle import REDACT_PARAM, Outcome
from inferq.metrics import CACHE_HITS, CACHE_MISSES, FEEDBACK, JOBS_SUBMITTED
from inferq.models import Evaluation, Feedback, Job, JobStatus
from inferq.protocol import ChatMessage, JobInput, JobParams, TokenData
from inferq.queue import ENQUEUED_KEY, PRIORITIES
from inferq.registry import ModelSpec, Registry
from inferq.settings import Settings
from inferq.webhooks import job_timings

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Created:
    job: Job
    replayed: bool  # an earlier request with the same Idempotency-Key made it
    enqueued: bool = False
    cached: bool = False  # answered from the response cache: created already succeeded


def resolve_model(registry: Registry, name: str) -> ModelSpec:
    spec = registry.get(name)
    if spec is None:
        raise InvalidRequest(
            f"unknown model {name!r}; available: {', '.join(sorted(registry.names()))}"
        )
    return spec


def routed(registry: Registry, body: JobCreate) -> str:
    """The model asked for, `auto` routed by the models file on the input as sent."""
    messages = [ChatMessage(role=m.role, content=m.content) for m in body.messages or []]
    job_input = JobInput(prompt=body.prompt, messages=messages if body.messages else None)
    return registry.resolve(body.model, job_input)


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
        # top_p 1 keeps every token, as no top_p does; TGI refuses it (it wants < 1).
        top_p=None if body.top_p == 1 else body.top_p,
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
        "user": body.user,
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


async def fitted_input(state: AppState, spec: ModelSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The job's input trimmed to its model's context window, and how many messages it lost."""
    job_input = JobInput.model_validate(values["input"])
    fitted = await fit_context(state.tokens, spec, job_input, values["params"]["max_tokens"])
    return {"input": fitted.input.stored(), "dropped_messages": fitted.dropped_messages}


async def create_job(
    state: AppState,
    key: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    digest: str | None = None,
    gate: Gate | None = None,
) -> Created:
    """`digest` is the request's hash when the caller hashes what it was sent (the OpenAI
    routes do); by default it is the hash of `body`. `gate` applies the key's limits.

    A session of the request's own is opened only for an Idempotency-Key: every other new job
    is written by the batcher (or, for a cache hit, in one autocommit round trip)."""
    check_size(body, state.settings)
    if body.webhook is not None:
        await guard_url(str(body.webhook.url), state.settings)
    spec = resolve_model(state.registry, routed(state.registry, body))
    values = job_values(body, spec, key)
    if state.settings.redact_inputs:
        values["params"] = {**values["params"], REDACT_PARAM: True}
    # Keyed by the request as sent (fitting it to the context is deterministic): a hit needs
    # no tokenizer call.
    hit = await _from_cache(state, key, spec, values)
    if not hit:
        values |= await fitted_input(state, spec, values)
    # Reserved under the job's id; the job's end settles it.
    reserved = gate is not None and await gate.admit(spec, values)
    try:
        if hit:
            created = await _insert_answered(state, key, values, (idempotency_key, digest), body)
        else:
            created = await _insert(state, key, body, values, idempotency_key, digest)
    except Exception:  # not a cancelled request: the batcher may still make its job
        if reserved and gate is not None:
            await gate.release(values["id"])
        raise
    if reserved and gate is not None and (created.replayed or hit):
        # The earlier request's job holds its own; a cache hit used nothing.
        await gate.release(values["id"])
    return created


async def _from_cache(
    state: AppState, key: Principal, spec: ModelSpec, values: dict[str, Any]
) -> bool:
    """Give a cacheable job its cache key; on a hit, turn `values` into the finished job's
    row and say so."""
    cache_key = cache.key_for(key.tenant, spec, values)
    if cache_key is None:
        return False
    values["params"] = {**values["params"], "cache_key": cache_key}
    answer = await cache.lookup(state.redis, cache_key)
    if answer is None:
        CACHE_MISSES.labels(spec.name).inc()
        return False
    CACHE_HITS.labels(spec.name).inc()
    now = datetime.now(UTC)
    values |= {
        "status": JobStatus.succeeded.value,
        "output": answer.output,
        "finish_reason": answer.finish_reason,
        "input_tokens": answer.input_tokens,
        "output_tokens": answer.output_tokens,
        "cost_usd": 0,
        "cached": True,
        "created_at": now,
        "started_at": now,
        "first_token_at": now,
        "finished_at": now,
    }
    if values["params"].get(REDACT_PARAM):  # created ended: its input goes at once
        values |= {"input": {}, "redacted_at": now}
    return True


async def _insert_answered(
    state: AppState,
    key: Principal,
    values: dict[str, Any],
    request: tuple[str | None, str | None],  # Idempotency-Key, digest
    body: JobCreate,
) -> Created:
    """A cache hit's finished row. Not through the batcher: it enqueues what it writes, and
    this job must not run."""
    idempotency_key, digest = request
    if idempotency_key is None:
        values["request_hash"] = digest
        row = {("metadata" if name == "metadata_" else name): v for name, v in values.items()}
        # One autocommit round trip, no ORM: a hit costs little more than its Redis GET.
        async with state.autocommit.connect() as conn:
            await conn.execute(insert(Job), [row])
        return Created(Job(**values, attempts=0), replayed=False, cached=True)
    created = await _insert_idempotent(state, key, body, values, idempotency_key, digest)
    return replace(created, cached=not created.replayed)


async def _insert(
    state: AppState,
    key: Principal,
    body: JobCreate,
    values: dict[str, Any],
    idempotency_key: str | None,
    digest: str | None,
) -> Created:
    if idempotency_key is not None:
        return await _insert_idempotent(state, key, body, values, idempotency_key, digest)
    values["request_hash"] = digest  # how a retry of this request can find the job
    # Committed and enqueued by the batcher, together with concurrent submits, on a
    # connection of its own.
    return Created(await state.batcher.submit(values), replayed=False, enqueued=True)


async def _insert_idempotent(
    state: AppState,
    key: Principal,
    body: JobCreate,
    values: dict[str, Any],
    idempotency_key: str,
    digest: str | None,
) -> Created:
    """The job, or the one an earlier request with this key made; committed."""
    digest = digest or request_hash(body)
    values |= {"idempotency_key": idempotency_key, "request_hash": digest}
    async with state.sessions() as session:
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
            created = Created(job, replayed=False)
        else:
            created = Created(await _replay(session, key, idempotency_key, digest), replayed=True)
        await session.commit()
    return created


async def submit_job(
    state: AppState,
    key: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    digest: str | None = None,
    gate: Gate | None = None,
) -> Created:
    """Create the job, committed, then hand it to the broker (unless the batcher did both)."""
    created = await create_job(state, key, body, idempotency_key, digest, gate)
    if created.cached:
        await _publish_answer(state, created.job)
    elif not created.replayed and not created.enqueued:
        await state.queue.put([created.job])
    if not created.replayed:
        _remember(state, created)
        JOBS_SUBMITTED.labels(created.job.model).inc()
    return created


async def _publish_answer(state: AppState, job: Job) -> None:
    """A cache hit's whole event stream, once its row is committed: SSE readers and the
    OpenAI routes read it as they read any finished job's."""
    events = Outcome.of_row(job).closing_events()
    if job.output:
        token = TokenData(text=job.output, tokens=job.output_tokens)
        events.insert(0, Event.of(token))
    await publish_end(state.publish_script, str(job.id), events, state.settings)


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


def _remember(state: AppState, created: Created) -> None:
    """A job this process just accepted, whose events are most often read next: its tenant,
    and, unless the cache answered it (its stream is written), its status for a moment (what
    its events open with until the worker writes its own)."""
    job = created.job
    state.job_tenants[job.id] = job.tenant
    if not created.cached:
        state.fresh_jobs[job.id] = Job(id=job.id, tenant=job.tenant, status=job.status, attempts=0)


async def job_if_unseen(state: AppState, key: Principal, job_id: uuid.UUID) -> Job | None:
    """404 unless the job is this tenant's; the job row if this process had to read it, the
    job as this process accepted it if that was a moment ago, else None.

    A job's tenant never changes, so each process remembers it: the thousandth reader of a
    job's events costs no query, and neither does the first, on the process that accepted
    the job, as its submitter most often reads them next.
    """
    tenant = state.job_tenants.get(job_id)
    if tenant is None:
        async with state.sessions() as session:  # only then: most readers cost no session
            job = await get_job(session, key, job_id)
        state.job_tenants[job_id] = job.tenant
        return job
    if tenant != key.tenant:
        raise NotFound(f"no job {job_id}")
    return state.fresh_jobs.get(job_id)


# A poll counts at most this many jobs before a queued one (ix_jobs_queued_position): deeper
# in the queue the position reads as this, and a poll stays cheap however long the queue.
POSITION_CAP = 10_000


async def queue_position(session: AsyncSession, job: Job) -> int | None:
    """How many jobs will run before this queued one: its model's queued jobs of a higher
    priority class, and of its own class those submitted before it (all tenants)."""
    if job.status != JobStatus.queued:
        return None
    mine = PRIORITIES.get(job.priority, 0)
    higher = [name for name, step in PRIORITIES.items() if step < mine]
    ahead = (
        select(Job.id)
        .where(
            Job.status == JobStatus.queued,
            Job.model == job.model,
            or_(Job.priority.in_(higher), and_(Job.priority == job.priority, Job.id < job.id)),
        )
        .limit(POSITION_CAP)
        .subquery()
    )
    return int(await session.scalar(select(func.count()).select_from(ahead)) or 0)


async def queue_eta(state: AppState, job: Job, position: int | None) -> float | None:
    """Seconds until a queued job starts, at its model's starts per second of the last
    minute; None when it is not queued or nothing started lately."""
    if position is None:
        return None
    return cache.eta_seconds(position, await cache.starts_per_second(state.redis, job.model))


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
        JobEvents(state.link, state.hub, state.sessions, job_id, None),
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
    key = stream_key(str(job.id))
    return progress(from_reply(await state.link.call("XRANGE", key, "-", "+", retry=True)))


def to_out(
    job: Job,
    position: int | None = None,
    so_far: Progress | None = None,
    eta_seconds: float | None = None,
    quality: Quality | None = None,
) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    # Backends' and client libraries' messages can name hosts: not the tenant's business.
    message = redact_addresses(job.error_message or "")
    error = ErrorInfo(type=job.error_type, message=message) if job.error_type else None
    return JobOut(
        id=job.id,
        status=job.status,
        model=job.model,
        requested_model=job.requested_model,
        user=job.user,
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
        dropped_messages=job.dropped_messages or 0,
        attempts=job.attempts,
        queue_position=position,
        eta_seconds=eta_seconds,
        metadata=job.metadata_,
        feedback=quality.feedback if quality else None,
        evaluation=quality.evaluation if quality else None,
        redacted_at=job.redacted_at,
        links=Links(self=base, events=f"{base}/events", cancel=f"{base}/cancel"),
    )


# ------------------------------------------------------------------ feedback and evaluation


@dataclass(frozen=True, slots=True)
class Quality:
    """What people and the judge said of a job's answer."""

    feedback: FeedbackInfo | None = None
    evaluation: EvaluationInfo | None = None


async def rate_job(
    session: AsyncSession, key: Principal, job_id: uuid.UUID, body: FeedbackCreate
) -> FeedbackOut:
    """Store the key's rating of an ended job; a later one from the same key replaces it."""
    job = await get_job(session, key, job_id)
    if not JobStatus(job.status).terminal:
        raise Conflict(f"job {job_id} is {job.status}: rate it once it has ended")
    values = {"rating": body.rating, "comment": body.comment, "created_at": func.now()}
    stored = (
        await session.execute(
            insert(Feedback)
            .values(job_id=job_id, api_key_id=key.key_id, **values)
            .on_conflict_do_update(index_elements=["job_id", "api_key_id"], set_=values)
            .returning(Feedback.rating, Feedback.comment, Feedback.created_at)
        )
    ).one()
    FEEDBACK.labels(job.model, "up" if body.rating > 0 else "down").inc()
    return FeedbackOut(
        job_id=job_id, rating=stored.rating, comment=stored.comment, created_at=stored.created_at
    )


async def quality_of(
    session: AsyncSession, key: Principal, jobs: list[Job]
) -> dict[uuid.UUID, Quality]:
    """Each ended job's feedback (the caller key's, else the latest) and judged evaluation;
    two indexed queries whatever the number of jobs."""
    ended = [j.id for j in jobs if JobStatus(j.status).terminal]
    if not ended:
        return {}
    mine = Feedback.api_key_id.is_not_distinct_from(key.key_id)
    ratings = await session.execute(
        select(Feedback.job_id, Feedback.rating, Feedback.comment)
        .where(Feedback.job_id.in_(ended))
        .distinct(Feedback.job_id)
        .order_by(Feedback.job_id, mine.desc(), Feedback.created_at.desc(), Feedback.id.desc())
    )
    feedback = {r.job_id: FeedbackInfo(rating=r.rating, comment=r.comment) for r in ratings}
    verdicts = await session.execute(
        select(
            Evaluation.job_id,
            Evaluation.score,
            Evaluation.rationale,
            Evaluation.judge_model,
            Evaluation.error,
        ).where(Evaluation.job_id.in_(ended), Evaluation.judged_at.is_not(None))
    )
    evaluation = {
        r.job_id: EvaluationInfo(
            score=r.score,
            rationale=r.rationale,
            judge_model=r.judge_model,
            # A failed judge's job's error is its backend's, which may name where it is.
            error=redact_addresses(r.error) if r.error else r.error,
        )
        for r in verdicts
    }
    return {
        job_id: Quality(feedback.get(job_id), evaluation.get(job_id))
        for job_id in ended
        if job_id in feedback or job_id in evaluation
    }
