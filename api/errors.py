"""Domain errors carry their HTTP status; one set of handlers renders the error envelope.

Besides the domain errors: a dependency that is down (Postgres, Redis) is a 503 with
Retry-After, a body that is not JSON is a 422 that says why, and anything unexpected is a
JSON 500, never a bare "Internal Server Error".
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("inferq.api")

# Long enough for a restarting database or a failover, short enough to notice recovery.
RETRY_AFTER_SECONDS = 5

Dependency = Literal["postgres", "redis", "a backing service"]

# What each dependency is called in messages to callers (no hosts, ports or users).
DEPENDENCY_WORDS: dict[str, str] = {
    "postgres": "the database",
    "redis": "Redis (events and queue)",
    "a backing service": "a backing service",
}

_POSTGRES_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free in time
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
)
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
    errno.EPIPE,
}


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorEnvelope(BaseModel):
    """Every error the API answers: `{"error": {"type", "message"}}`."""

    error: ErrorDetail


class ApiError(Exception):
    status = 400
    type = "invalid_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers

    @property
    def detail(self) -> ErrorDetail:
        return ErrorDetail(type=self.type, message=self.message)


class InvalidRequest(ApiError):
    status = 422
    type = "invalid_request"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class Forbidden(ApiError):
    status = 403
    type = "permission_denied"


class NotFound(ApiError):
    status = 404
    type = "not_found"


class Conflict(ApiError):
    status = 409
    type = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    type = "request_too_large"


class ServiceUnavailable(ApiError):
    status = 503
    type = "service_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @classmethod
    def of(cls, dependency: Dependency) -> ServiceUnavailable:
        words = DEPENDENCY_WORDS[dependency]
        return cls(f"{words} is unavailable; retry in a few seconds")


def envelope(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


# --- what a tenant may read ----------------------------------------------------------------

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()\[\]]+", re.IGNORECASE)
# An IPv4 address, localhost or a dotted host name (its last label starts with a letter,
# so that numbers such as 1.5 are left alone), with its port if any.
_ADDRESS = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|(?:[a-z0-9-]+\.)+[a-z][a-z0-9-]*)"
    r"(?::\d{1,5})?(?=[\s'\")\],;/]|$)",
    re.IGNORECASE,
)


def redact_addresses(message: str) -> str:
    """The message without URLs or host addresses: where the backends are is not the
    tenant's business (errors of backends and client libraries name them)."""
    return _ADDRESS.sub("<backend>", _URL.sub("<backend>", message))


# --- which dependency an exception says is down ---------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those that caused it (SQLAlchemy wraps the driver's errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _raised_in(exc: BaseException) -> Dependency | None:
    """The client library whose code raised `exc`, from the modules of its traceback."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith(("asyncpg", "sqlalchemy", "inferq.db")):
            return "postgres"
        if module.startswith(("redis", "kombu", "inferq.queue", "inferq.redis_clients")):
            return "redis"
    return None


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return True
    # asyncpg joins the errors of every address it tried into one plain OSError.
    return isinstance(exc, OSError) and (
        exc.errno in _NETWORK_ERRNOS or str(exc).startswith("Multiple exceptions")
    )


def dependency_down(exc: BaseException) -> Dependency | None:
    """Which dependency `exc` says is unreachable, or None for any other error."""
    for link in _chain(exc):
        if isinstance(link, _POSTGRES_ERRORS):
            return "postgres"
        if isinstance(link, sqlalchemy.exc.DBAPIError) and link.connection_invalidated:
            return "postgres"
        if isinstance(link, _REDIS_ERRORS):
            return "redis"
    for link in _chain(exc):
        if _is_network_error(link):
            return _raised_in(link) or "a backing service"
    return None


# --- bodies that are not JSON ---------------------------------------------------------------


def _where(doc: object, pos: int) -> str:
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else str(doc)
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"line {line} column {column} (char {pos})"


def invalid_json(exc: RequestValidationError) -> str | None:
    """In words, why the body is not JSON (FastAPI says only "JSON decode error")."""
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "the body is not valid JSON: Expecting value at line 1 column 1 (char 0)"
    if first.get("type") != "json_invalid":
        return None
    loc = first.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else 0
    reason = (first.get("ctx") or {}).get("error", "malformed")
    return f"the body is not valid JSON: {reason} at {_where(exc.body, pos)}"


def unreadable_body(exc: StarletteHTTPException) -> str | None:
    """In words, why FastAPI could not parse the body ("There was an error parsing the body")."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (
            "the body is not valid JSON: it is not UTF-8 text "
            f"(byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
        )
    if cause is not None and exc.status_code == 400:
        return f"the body could not be read: {cause.__class__.__name__}"
    return None


# --- validation errors in words (both envelopes) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation error: where (a dotted path, without FastAPI's leading `body`) and what."""

    param: str | None
    message: str  # "where: what", or what alone


def problems(errors: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """Pydantic's errors (a request's or a model's) as the error envelopes word them."""
    found = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or None
        what = str(error.get("msg"))
        found.append(Problem(where, f"{where}: {what}" if where else what))
    return found


def describe(errors: Sequence[Mapping[str, Any]], most: int = 5) -> str:
    """The first few errors in one message."""
    return "; ".join(problem.message for problem in problems(errors[:most]))


# --- handlers -------------------------------------------------------------------------------


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(envelope(exc.type, exc.message), exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = invalid_json(exc) or describe(exc.errors())
    return JSONResponse(envelope("invalid_request", message), 422)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    unreadable = unreadable_body(exc)
    if unreadable is not None:
        return JSONResponse(envelope("invalid_request", unreadable), 422)
    type_ = {404: "not_found", 405: "method_not_allowed", 401: "authentication_error"}.get(
        exc.status_code, "http_error"
    )
    return JSONResponse(envelope(type_, str(exc.detail)), exc.status_code, headers=exc.headers)


def unavailable(scope: Scope, dependency: Dependency) -> ServiceUnavailable:
    """The 503 for a dependency that is down, logged as one line (an outage is loud enough)."""
    log.warning(
        "%s is down; answering 503",
        dependency,
        extra={"method": scope.get("method"), "path": scope.get("path")},
    )
    return ServiceUnavailable.of(dependency)


def log_unexpected(scope: Scope, exc: BaseException) -> None:
    """The traceback, the method and the path; never the body, which is the tenant's."""
    log.error(
        "unexpected error",
        exc_info=exc,
        extra={"method": scope.get("method"), "path": scope.get("path")},
    )


def unhandled(scope: Scope, exc: Exception) -> JSONResponse:
    """A 503 when `exc` says a dependency is down; any other error is a logged 500."""
    dependency = dependency_down(exc)
    if dependency is not None:
        error = unavailable(scope, dependency)
        return JSONResponse(envelope(error.type, error.message), 503, headers=error.headers)
    log_unexpected(scope, exc)
    return JSONResponse(envelope("internal_error", "internal error"), 500)


async def _outage_or_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unhandled(request.scope, exc)


class CatchAll:
    """The last line: any exception no handler took is a JSON 500 (or a 503 for an outage).

    Starlette's own handler for `Exception` re-raises after answering, so the server logs
    the error a second time; this one logs once, with the traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:  # too late for an answer: the server closes the connection
                raise
            await unhandled(scope, exc)(scope, receive, send)


OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    redis.exceptions.RedisError,
    OSError,  # ConnectionError, TimeoutError, socket.gaierror
)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error in OUTAGE_ERRORS:
        app.add_exception_handler(error, _outage_or_unexpected)
