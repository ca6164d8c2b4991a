"""The running API against its own OpenAPI document, with schemathesis.

Every answer must be documented: its status, its content type and its body's schema, and
none may be a server error. Generated requests carry the bootstrap key, so they reach past
authentication; their number is bounded so that the module runs in a minute or two.

The document is built from the application at collection time (the test cases are made
from it before the platform starts); one test checks that the platform serves the same.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from inferq.settings import Settings
from tests.conftest import BOOTSTRAP_KEY, Platform

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
AUTH = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}


def _document() -> dict[str, Any]:
    return create_app(Settings(environment="test")).openapi()


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261128,  # the same cases every run, so that a failure reproduces
        "headers": AUTH,
        "request-timeout": 30,
        "generation": {"max-examples": 12},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(_document(), config=CONFIG)


def test_the_platform_serves_this_document(platform: Platform) -> None:
    served = httpx.get(f"{platform.api_url}/openapi.json", timeout=10).json()
    assert served == _document()


def _on_a_served_model(case: schemathesis.Case) -> None:
    """Name a model the platform serves in half the bodies that name one (a generated name
    is unknown), so that the success paths run too: jobs, completions, streams."""
    body = case.body
    if isinstance(body, dict) and "model" in body and len(repr(body)) % 2 == 0:
        body["model"] = "sim"


@schema.parametrize()
def test_every_answer_is_as_documented(case: schemathesis.Case, platform: Platform) -> None:
    _on_a_served_model(case)
    case.call_and_validate(base_url=platform.api_url, headers=AUTH, checks=CHECKS)


def test_the_document_declares_bearer_auth_and_the_error_envelope() -> None:
    """/docs offers an Authorize button, and errors are documented in their real shape."""
    document = _document()
    schemes = document["components"]["securitySchemes"]
    assert any(s.get("type") == "http" and s.get("scheme") == "bearer" for s in schemes.values())
    submit = document["paths"]["/v1/jobs"]["post"]
    assert submit.get("security"), "submitting a job is not documented as needing a key"
    envelope = submit["responses"]["422"]["content"]["application/json"]["schema"]
    assert "HTTPValidationError" not in str(envelope)
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert list(events["content"]) == ["text/event-stream"]
