"""bench/aiperf_compare.py reads aiperf's JSON export and asks aiperf for what the comparison
needs (aiperf itself runs from a virtualenv of its own, by hand: docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.aiperf_compare import AiperfRun, Load, aiperf_command, write_tokenizer
from sim.model import VOCABULARY

# The fields of an export written by aiperf 0.13.0 through the platform (trimmed).
EXPORT = {
    "output_token_throughput": {"unit": "tokens/sec", "avg": 4400.28},
    "time_to_first_token": {"unit": "ms", "avg": 208.8, "p50": 184.17, "p99": 503.37},
    "inter_token_latency": {"unit": "ms", "avg": 10.9, "p50": 10.6, "p99": 19.2},
    "request_count": {"unit": "requests", "avg": 1024.0},
}


def test_an_export_without_failures_reads_as_none_failed() -> None:
    run = AiperfRun.of(EXPORT)
    assert run.requests == 1024 and run.errors == 0
    assert (run.tokens_per_s, run.ttft_p50_ms, run.ttft_p99_ms) == (4400.28, 184.17, 503.37)
    failed = AiperfRun.of({**EXPORT, "error_request_count": {"avg": 3.0}})
    assert failed.errors == 3


def test_only_the_platform_run_carries_the_key_and_replies_are_fixed_length(
    tmp_path: Path,
) -> None:
    load = Load("aiperf", "relay-10ms", tmp_path, 32, 64, 16, tmp_path)
    direct = aiperf_command(load, "http://sim", None, 64, tmp_path / "d")
    platform = aiperf_command(load, "http://api", "iq-secret", 64, tmp_path / "p")
    assert "--api-key" not in direct
    assert platform[platform.index("--api-key") + 1] == "iq-secret"
    for command in (direct, platform):
        assert command[command.index("--osl") + 1] == "64"
        assert command[command.index("--osl-stddev") + 1] == "0"
        assert command[command.index("--request-count") + 1] == str(64 * 16)
        assert "--streaming" in command and "--use-server-token-count" in command


def test_the_tokenizer_knows_every_word_the_simulator_says(tmp_path: Path) -> None:
    tokenizer = json.loads((write_tokenizer(tmp_path) / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    assert set(VOCABULARY) <= set(vocab)
    assert len(set(vocab.values())) == len(vocab)  # one id a word
