"""OpenAI's error envelope on the OpenAI-compatible routes, whatever raised the error."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from api.errors import (
    ApiError,
    Problem,
    dependency_down,
    invalid_json,
    log_unexpected,
    problems,
    unavailable,
    unreadable_body,
)
from api.openai.schemas import ErrorBody, ErrorDetail

JOB_HEADER = "X-Inferq-Job-Id"

# OpenAI's error `type` for each status; inferq's own error type travels in `code`.
TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """An error to answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        job_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=error_type(status), param=param, code=code)
        self.headers = dict(headers or {})
        if job_id is not None:
            self.headers[JOB_HEADER] = job_id


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return TYPES.get(status, "invalid_request_error")


def from_api_error(exc: ApiError) -> OpenAIError:
    # OpenAI answers 400 where the jobs API answers 422.
    status = 400 if exc.status == 422 else exc.status
    code = "invalid_api_key" if exc.status == 401 else exc.type
    return OpenAIError(status, exc.message, code=code, headers=exc.headers)


def from_validation(exc: RequestValidationError) -> OpenAIError:
    """A 400 naming the first offending parameter, as OpenAI does."""
    not_json = invalid_json(exc)
    if not_json is not None:
        return OpenAIError(400, not_json, code="invalid_json")
    first = next(iter(problems(exc.errors()[:1])), Problem(None, "invalid request"))
    return OpenAIError(400, first.message, param=first.param, code="invalid_value")


def from_http_error(exc: HTTPException) -> OpenAIError:
    """Starlette's and FastAPI's own errors (a body that cannot be parsed, chiefly)."""
    unreadable = unreadable_body(exc)
    if unreadable is not None:
        return OpenAIError(400, unreadable, code="invalid_json")
    return OpenAIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


def from_unexpected(request: Request, exc: Exception) -> OpenAIError:
    """A 503 while a dependency is down (the SDK retries it); any other error is a 500."""
    dependency = dependency_down(exc)
    if dependency is not None:
        down = unavailable(request.scope, dependency)
        return OpenAIError(503, down.message, code=down.type, headers=down.headers)
    log_unexpected(request.scope, exc)
    return OpenAIError(500, "internal error", code="internal_error")


def render(exc: OpenAIError) -> JSONResponse:
    body = ErrorBody(error=exc.detail).model_dump()
    return JSONResponse(body, exc.status, headers=exc.headers)


class OpenAIRoute(APIRoute):
    """Renders every error raised while handling the request (auth, validation, service)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handle(request)
            except OpenAIError as exc:
                return render(exc)
            except ApiError as exc:
                return render(from_api_error(exc))
            except RequestValidationError as exc:
                return render(from_validation(exc))
            except HTTPException as exc:
                return render(from_http_error(exc))
            except Exception as exc:
                return render(from_unexpected(request, exc))

        return guarded
