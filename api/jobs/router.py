"""/v1/jobs: submit, poll, list, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from api.deps import CurrentKey, SessionDep, StateDep
from api.jobs import service
from api.jobs.schemas import FeedbackCreate, FeedbackOut, JobCreate, JobList, JobOut
from api.limits import SubmitGate
from api.openapi import AUTHENTICATED, error_responses
from inferq.models import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "", status_code=202, response_model=JobOut, responses=error_responses(*AUTHENTICATED, 409, 413)
)
async def submit(
    body: JobCreate,
    key: CurrentKey,
    state: StateDep,
    response: Response,
    gate: SubmitGate,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    created = await service.submit_job(state, key, body, idempotency_key, gate=gate)
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{created.job.id}"
    return service.to_out(created.job)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(*AUTHENTICATED, 404))
async def get(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, state: StateDep) -> JobOut:
    """The job; while it runs, `output` is the text so far and `usage.output_tokens` its count."""
    job = await service.get_job(session, key, job_id)
    position = await service.queue_position(session, job)
    eta = await service.queue_eta(state, job, position)
    quality = (await service.quality_of(session, key, [job])).get(job.id)
    progress = await service.running_progress(state, job)
    return service.to_out(job, position, progress, eta, quality)


@router.get("", response_model=JobList, responses=error_responses(*AUTHENTICATED))
async def list_(
    key: CurrentKey,
    session: SessionDep,
    status: JobStatus | None = None,
    cursor: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    jobs, next_cursor = await service.list_jobs(session, key, status, cursor, limit)
    quality = await service.quality_of(session, key, jobs)
    data = [service.to_out(j, quality=quality.get(j.id)) for j in jobs]
    return JobList(data=data, next_cursor=next_cursor)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={
        202: {"model": JobOut, "description": "Running: asked to stop, not ended yet"},
        **error_responses(*AUTHENTICATED, 404, 409),
    },
)
async def cancel(
    job_id: uuid.UUID, key: CurrentKey, session: SessionDep, state: StateDep, response: Response
) -> JobOut:
    job = await service.cancel_job(session, state, key, job_id)
    if not JobStatus(job.status).terminal:
        response.status_code = 202
    return service.to_out(job)


@router.post(
    "/{job_id}/feedback",
    status_code=201,
    response_model=FeedbackOut,
    responses=error_responses(*AUTHENTICATED, 404, 409, 413),
)
async def feedback(
    job_id: uuid.UUID, body: FeedbackCreate, key: CurrentKey, session: SessionDep
) -> FeedbackOut:
    """Rate an ended job's answer: 1 (up) or -1 (down), with an optional comment. The latest
    rating from a key replaces its earlier one; a job not ended yet is a 409."""
    return await service.rate_job(session, key, job_id, body)
