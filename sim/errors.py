"""TGI's error vocabulary: inference errors, body rejections, dropped connections."""

from __future__ import annotations

from typing import Any

_STATUS = {
    "validation": 422,
    "generation": 424,
    "overloaded": 429,
    "incomplete_generation": 500,
}


class SimError(Exception):
    """An inference error that TGI renders as `{"error", "error_type"}`."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    @property
    def status_code(self) -> int:
        """HTTP status TGI uses for this error outside a stream."""
        return _STATUS.get(self.error_type, 500)

    def payload(self) -> dict[str, str]:
        """TGI `ErrorResponse` body."""
        return {"error": self.message, "error_type": self.error_type}

    def openai_payload(self) -> dict[str, Any]:
        """Error event of a chat stream; TGI hard-codes status 422 there."""
        return {"error": {"message": self.message, "http_status_code": 422}}


def invalid(detail: str) -> SimError:
    """An input validation error."""
    return SimError("validation", f"Input validation error: {detail}")


def overloaded() -> SimError:
    """The concurrency limit was reached."""
    return SimError("overloaded", "Model is overloaded")


def generation_failed(detail: str) -> SimError:
    """A failure while tokens were being generated."""
    return SimError("generation", f"Request failed during generation: {detail}")


def incomplete() -> SimError:
    """The backend ended a non-stream generation early."""
    return SimError("incomplete_generation", "Incomplete generation")


class BodyRejection(Exception):
    """A body axum refuses before the handler runs, answered in plain text."""

    def __init__(self, status_code: int, text: str) -> None:
        super().__init__(text)
        self.status_code = status_code
        self.text = text


class DropConnection(Exception):
    """Abort the HTTP connection without finishing the response."""
