"""The models file: what it accepts, what it refuses, where backend keys come from."""

from __future__ import annotations

import pytest

from inferq.protocol import ChatMessage, JobInput
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


ROUTED = """
[models.small]
url = "http://small"
[models.large]
url = "http://large"

[routing]
default = "small"
[[routing.rules]]
model = "small"
max_input_tokens = 10
[[routing.rules]]
model = "large"
keywords = ["Prove", "step by step"]
[[routing.rules]]
model = "large"
min_input_tokens = 100

[judge]
model = "large"
sample_rate = 0.05
prompt = "Rate this answer: {output}"
"""


def test_auto_is_routed_by_the_first_matching_rule() -> None:
    registry = Registry.from_toml(ROUTED)
    long = "x" * 80  # 20 estimated tokens: past the first rule
    assert registry.resolve("auto", JobInput(prompt="prove it")) == "small"  # short first
    assert registry.resolve("auto", JobInput(prompt=long + " PROVE it")) == "large"
    chat = [
        ChatMessage(role="user", content=long),
        ChatMessage(role="user", content="step by step"),
    ]
    assert registry.resolve("auto", JobInput(messages=chat)) == "large"
    assert registry.resolve("auto", JobInput(prompt="y" * 400)) == "large"  # 100 tokens
    assert registry.resolve("auto", JobInput(prompt="y" * 396)) == "small"  # the default
    assert registry.resolve("large", JobInput(prompt="hi")) == "large"  # no routing asked
    assert registry.offered() == ["small", "large", "auto"]
    assert registry.judge is not None and registry.judge.sample_rate == 0.05


def test_without_a_routing_table_auto_is_no_model() -> None:
    registry = Registry.from_toml(MODELS)
    assert registry.resolve("auto", JobInput(prompt="hi")) == "auto"
    assert not registry.serves("auto") and "auto" not in registry.offered()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[models.small]\nurl = 'http://x'\nmax_token = 64",
            "models file: unknown key 'max_token' in [models.small]",
        ),
        (
            "[models.small]\nurl = 'http://x'\nname = 'big'",
            "models file: unknown key 'name' in [models.small]",
        ),
        (
            "[models.small]\nmax_tokens = 64",
            "models file: missing key 'url' in [models.small]",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[routnig]\ndefault = 'small'",
            "models file: unknown key 'routnig' at the top level",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[routing]\ndefault = 'small'\nfallback = 'x'",
            "models file: unknown key 'fallback' in [routing]",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[routing]\ndefault = 'small'\n"
            "[[routing.rules]]\nmodel = 'small'\nkeyword = ['a']",
            "models file: unknown key 'keyword' in [[routing.rules]] #1",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[routing]\ndefault = 'large'",
            "models file: [routing] default 'large' is not a configured model (small)",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[routing]\ndefault = 'small'\n"
            "[[routing.rules]]\nmodel = 'large'\nmax_input_tokens = 5",
            "models file: [[routing.rules]] #1 model 'large' is not a configured model (small)",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[judge]\nmodel = 'small'\nrate = 0.1",
            "models file: unknown key 'rate' in [judge]",
        ),
        (
            "[models.small]\nurl = 'http://x'\n[judge]\nmodel = 'large'\nsample_rate = 0.1",
            "models file: [judge] model 'large' is not a configured model (small)",
        ),
        (
            "[models.auto]\nurl = 'http://x'",
            "models file: 'auto' is reserved for routing; rename it",
        ),
    ],
)
def test_models_file_errors_are_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ModelsFileError) as raised:
        Registry.from_toml(text)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "table",
    [
        "[judge]\nmodel = 'small'\nsample_rate = 1.5",  # above 1
        "[judge]\nmodel = 'small'\nsample_rate = -0.1",
        "[routing]\ndefault = 'small'\n[[routing.rules]]\nmodel = 'small'",  # no condition
        "[routing]\ndefault = 'small'\n[[routing.rules]]\nmodel = 'small'\nkeywords = []",
    ],
)
def test_invalid_routing_and_judge_tables_are_refused(table: str) -> None:
    with pytest.raises(ModelsFileError) as raised:
        Registry.from_toml("[models.small]\nurl = 'http://x'\n" + table)
    assert "\n" not in str(raised.value)
