"""OpenAI's error envelope on the OpenAI-compatible routes, whatever raised the error."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from api.errors import ApiError
from api.openai.schemas import ErrorBody, ErrorDetail

log = logging.getLogger("inferq.openai")

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
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = str(first.get("msg", "invalid request"))
    return OpenAIError(
        400, f"{param}: {message}" if param else message, param=param, code="invalid_value"
    )


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
            except Exception:
                log.exception("unexpected error on %s", request.url.path)
                return render(OpenAIError(500, "internal error", code="internal_error"))

        return guarded
