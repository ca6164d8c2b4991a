"""The models file: what it accepts, what it refuses, where backend keys come from."""

from __future__ import annotations

import pytest

from inferq.registry import ModelsFileError, Registry

MODELS = """
[models.small]
url = "http://tgi-small:8080/"
price_input_per_mtok = 0.25
price_output_per_mtok = 1.25

[models.large]
backend = "openai"
url = "http://vllm:8000/v1"
api_key_env = "LARGE_KEY_FOR_TEST"
"""


def test_models_file_defaults_queues_prices_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGE_KEY_FOR_TEST", "s3cret")
    registry = Registry.from_toml(MODELS)
    small, large = registry.get("small"), registry.get("large")
    assert small is not None and large is not None
    assert (small.backend, small.url, small.queue) == (
        "tgi",
        "http://tgi-small:8080",
        "inferq.small",
    )
    assert small.cost_usd(1_000_000, 1_000_000) == pytest.approx(1.5)
    assert small.api_key is None
    assert large.api_key is not None and large.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(large)


@pytest.mark.parametrize(
    "text",
    [
        "",  # no model at all
        "[models.x]\nbackend = 'grpc'\nurl = 'http://x'",  # unknown backend
        "[models.x]\nmax_tokens = 5",  # no url
        "[models.x]\nurl = 'http://x'\nmax_tokens = 0",
        "[models.x\nurl = 'http://x'",  # not TOML
    ],
)
def test_invalid_models_files_are_refused(text: str) -> None:
    with pytest.raises(ModelsFileError):
        Registry.from_toml(text)
