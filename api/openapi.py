"""What the OpenAPI document says about the responses FastAPI cannot see: errors and streams."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from api.errors import RETRY_AFTER_SECONDS, ErrorEnvelope

Responses = dict[int | str, dict[str, Any]]

DESCRIPTIONS = {
    400: "The request is invalid",
    401: "The API key is missing or invalid",
    403: "The key may not do this",
    404: "Not found (or another tenant's)",
    409: "Conflicts with the resource's state or an earlier request",
    413: "The body is over the size limit",
    422: "The request is invalid",
    429: "A limit of the key was reached; retry after Retry-After seconds",
    500: "An unexpected error",
    502: "The model's backend failed",
    503: "A dependency (Postgres, Redis) or the backend is unavailable; retry later",
    504: "The model's backend did not answer in time",
}

RETRY_AFTER = {
    "Retry-After": {
        "description": f"Seconds to wait before retrying (typically {RETRY_AFTER_SECONDS})",
        "schema": {"type": "integer"},
    }
}

# Statuses any authenticated route can answer.
AUTHENTICATED = (401, 422, 429, 503)


def error_responses(*statuses: int, model: type[BaseModel] = ErrorEnvelope) -> Responses:
    """The error envelope for each status, with Retry-After where one is sent."""
    responses: Responses = {}
    for status in statuses:
        response: dict[str, Any] = {"model": model, "description": DESCRIPTIONS[status]}
        if status in (429, 503):
            response["headers"] = RETRY_AFTER
        responses[status] = response
    return responses


# One server-sent event as a client parses it: `data` is the event's JSON text (or the
# OpenAI routes' final `[DONE]`); `event` and `id` are there where the route names them.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def event_stream(description: str) -> Responses:
    return {
        200: {
            "description": description,
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    }


def _drop_json_placeholders(document: dict[str, Any]) -> None:
    """A streaming route's 200 is text/event-stream only.

    FastAPI adds `application/json` with an empty schema for any route that returns a
    Response object of its own; where the route documents a stream instead, that entry
    describes nothing the route sends.
    """
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if "text/event-stream" in content and content.get("application/json") == {
                    "schema": {}
                }:
                    del content["application/json"]


def install(app: FastAPI) -> None:
    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _drop_json_placeholders(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
