"""The worker's lean reader of backend streams gives what huggingface_hub's parser gives.

Each stream is read twice, through the same stream classes: with the lean reader
(workers/backends/sse.py) and with huggingface_hub's dataclasses. The deltas, the finish
reason, the usage and the error (its class, type and message) must be the same, on the
simulator's streams (every fault it has, TGI and chat) and on hand-written streams that take
the lean reader off its fast path.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2
import pytest
from huggingface_hub import InferenceClient

from inferq.embedded import free_port
from tests.servers import start_sim
from workers.backends import sse
from workers.backends.base import BackendError, GenerationRequest
from workers.backends.chat import ChatStream, OpenAIChatStream
from workers.backends.tgi import ClientStream, TextGenerationStream
from workers.engine import StreamEngine
from workers.publisher import FlushPace

FAULTS = [
    None,
    "overloaded",
    "validation",
    "generation",
    "http500",
    "disconnect",
    "cut",
    "abort",
    "nul",
    "garbage",
]
PROMPT = GenerationRequest(prompt="tell me a story", messages=None, max_tokens=24, seed=7)
CHAT = GenerationRequest(
    prompt=None,
    messages=[{"role": "user", "content": "tell me a story"}],
    max_tokens=24,
    seed=7,
    stop=["the"],
)


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url, child = start_sim(tmp_path_factory.mktemp("lean-reader"), "1")
    yield url
    child.stop()


@pytest.fixture(scope="module")
def slow_sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """1.5 s between tokens."""
    url, child = start_sim(tmp_path_factory.mktemp("lean-reader-slow"), "1500")
    yield url
    child.stop()


def _read(stream: ClientStream) -> tuple[Any, ...]:
    """Everything the worker takes from a stream."""
    deltas: list[str] = []
    try:
        deltas.extend(stream)
    except BackendError as exc:
        return ("error", deltas, type(exc).__name__, exc.type, exc.message)
    completion = stream.completion
    return (
        "done",
        deltas,
        completion.finish_reason,
        completion.input_tokens,
        completion.output_tokens,
    )


class _Collected:
    """A sink on the stream loop that only keeps the deltas (workers.engine.Sink)."""

    publisher = None
    max_tokens = 10_000

    def __init__(self) -> None:
        self.deltas: list[str] = []

    def took(self, deltas: list[str], now: float) -> None:
        self.deltas += deltas


def _relayed(engine: StreamEngine, make: Any) -> tuple[Any, ...]:
    """What the worker takes from the stream read on the stream loop, as the generation reads
    it there (workers/generate.py): its failures mapped by the stream, and what the loop
    leaves to huggingface_hub read by the stream itself."""
    stream = make(True)
    request = stream.lean_request()
    assert request is not None
    sink = _Collected()
    try:
        try:
            engine.relay(stream, request, stream.client.timeout, sink).wait()
            stream.ended()
        except sse.NotLean:
            return _read(make(True))
        except Exception as exc:
            raise stream.failure(exc) from exc
    except BackendError as exc:
        return ("error", sink.deltas, type(exc).__name__, exc.type, exc.message)
    finally:
        stream.close()
    completion = stream.completion
    return (
        "done",
        sink.deltas,
        completion.finish_reason,
        completion.input_tokens,
        completion.output_tokens,
    )


@pytest.fixture(scope="module", autouse=True)
def engine() -> Iterator[StreamEngine]:
    global _ENGINE
    _ENGINE = StreamEngine(None, FlushPace(0.02, 400.0, 0.1))  # no flushes: no publisher
    _ENGINE.start()
    yield _ENGINE
    _ENGINE.stop()


_ENGINE: StreamEngine


def _both(make: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """huggingface_hub's reading and the lean reader's, which the stream loop's must equal."""
    reference, lean = _read(make(False)), _read(make(True))
    assert _relayed(_ENGINE, make) == lean, "the stream loop read it otherwise"
    return reference, lean


@pytest.mark.parametrize("fault", FAULTS)
def test_tgi_streams_read_the_same(sim_url: str, fault: str | None) -> None:
    headers = {"X-Sim-Error": fault} if fault else None

    def make(lean: bool) -> ClientStream:
        client = InferenceClient(model=sim_url, api_key="-", timeout=30, headers=headers)
        return TextGenerationStream(client, PROMPT, lean=lean)

    reference, lean = _both(make)
    assert lean == reference
    if fault is None:
        assert reference[0] == "done" and reference[1]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", ["tgi", "openai"])
def test_chat_streams_read_the_same(sim_url: str, fault: str | None, kind: str) -> None:
    headers = {"X-Sim-Error": fault} if fault else None

    def make(lean: bool) -> ClientStream:
        if kind == "tgi":
            client = InferenceClient(model=sim_url, api_key="-", timeout=30, headers=headers)
            return ChatStream(client, CHAT, model="tgi", lean=lean)
        client = InferenceClient(base_url=sim_url, api_key="-", timeout=30, headers=headers)
        return OpenAIChatStream(client, CHAT, model="sim", lean=lean)

    reference, lean = _both(make)
    assert lean == reference


def _event(payload: object) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _tgi(text: str, special: bool = False, details: dict[str, Any] | None = None) -> str:
    token = {"id": 1, "text": text, "logprob": -0.1, "special": special}
    return _event({"index": 1, "token": token, "generated_text": None, "details": details})


FINISH = {"finish_reason": "length", "generated_tokens": 3, "seed": None, "input_length": 5}
CHOICE = {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}
USAGE = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}

# Bodies off the fast path: every error event TGI and OpenAI-compatible servers send,
# `[DONE]` written both ways, odd shapes, line breaks in odd places, keep-alive comments.
TGI_BODIES = {
    "plain": _tgi("a") + _tgi(" b") + _tgi("</s>", True, FINISH),
    "no space after data": "data:" + _tgi("a")[6:] + _tgi("b", details=FINISH),
    "keep-alive and CRLF": ":\r\n\r\n"
    + _tgi("a").replace("\n", "\r\n")
    + _tgi("b", details=FINISH),
    "details without input length": _tgi("a", details={"finish_reason": "eos_token"}),
    "finish reason not a string": _tgi("a", details={"finish_reason": 3}),
    "text in two chunks": _tgi("a")[:20] + "\x00SPLIT" + _tgi("a")[20:] + _tgi("b", details=FINISH),
    "line separator in the text": _tgi("a\u2028b") + _tgi("c", details=FINISH),
    "done marker": _tgi("a") + "data: [DONE]\n\n" + _tgi("b", details=FINISH),
    "done marker without space": _tgi("a") + "data:[DONE]\n\n",
    "not an object": _tgi("a") + "data: [1, 2]\n\n",
    "null event": "data: null\n\n",
    "no token": _event({"index": 1, "details": FINISH}),
    "special not a bool": _event({"token": {"text": "a", "special": 1}, "details": None}),
    # JSON that orjson reads otherwise than `json` (refused, or an integer read as a float).
    "lone surrogate": 'data: {"token": {"text": "a\\ud800", "special": false}}\n\n'
    + _tgi("b", details=FINISH),
    "counts past 64 bits": _tgi("a", details={**FINISH, "generated_tokens": 2**70}),
    **{
        f"error event {kind}": _tgi("a") + _event({"error": "it broke", "error_type": kind})
        for kind in [
            "generation",
            "overloaded",
            "validation",
            "incomplete_generation",
            "incomplete_generation_stream",
            "something_new",
        ]
    },
    "error event without type": _tgi("a") + _event({"error": "it broke"}),
    "error event false": _event({"error": False}),
}
CHAT_BODIES = {
    "plain": _event({"choices": [CHOICE]})
    + _event({"choices": [{**CHOICE, "delta": {"content": " there"}, "finish_reason": "stop"}]})
    + _event({"choices": [], "usage": USAGE})
    + "data: [DONE]\n\n",
    "usage on the last choice": _event(
        {"choices": [{**CHOICE, "finish_reason": "length"}], "usage": USAGE}
    ),
    "empty usage": _event({"choices": [{**CHOICE, "finish_reason": "stop"}], "usage": {}}),
    "empty delta": _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    "no delta": _event({"choices": [{"index": 0, "finish_reason": "stop"}]}),
    "null choices": _event({"choices": None, "usage": USAGE}),
    "content not a string": _event({"choices": [{**CHOICE, "delta": {"content": 5}}]}),
    "lone surrogate": 'data: {"choices": [{"index": 0, "delta": {"content": "\\udc80"}}]}\n\n',
    "usage past 64 bits": _event(
        {
            "choices": [{**CHOICE, "finish_reason": "stop"}],
            "usage": {**USAGE, "prompt_tokens": 2**65},
        }
    ),
    "choices not a list": _event({"choices": {"a": 1}}),
    "done without space": _event({"choices": [CHOICE]}) + "data:[DONE]\n\n",
    "tgi error event": _event({"choices": [CHOICE]})
    + _event({"error": {"message": "Model is overloaded", "http_status_code": 422}}),
    "openai error event": _event(
        {"error": {"message": "bad", "type": "invalid_request_error", "code": None}}
    ),
    "string error event": _event({"error": "it broke", "error_type": "generation"}),
}


class _Canned(BaseHTTPRequestHandler):
    """Answers every POST with the body named by the X-Body header, one chunk a line."""

    protocol_version = "HTTP/1.1"
    bodies: dict[str, str] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if "X-Status" in self.headers:  # a refusal: that status, the body as given
            self._refuse(int(self.headers["X-Status"]), self.headers.get("X-Refusal", ""))
            return
        body = self.bodies[self.headers["X-Body"]]
        if self.headers.get("X-Framing") == "close, stalled":  # the head, then nothing
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            time.sleep(20)
            return
        if self.headers.get("X-Framing") == "length":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body.encode())))
            self.end_headers()
            self.wfile.write(body.replace("\x00SPLIT", "").encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in body.encode().split(b"\x00SPLIT"):
            for line in part.splitlines(keepends=True):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _refuse(self, status: int, body: str) -> None:
        self.send_response(status)
        if status in (301, 302, 307, 308):  # to the same server, which answers 200 there
            self.send_header("Location", "/moved")
        self.send_header("Content-Type", "application/json" if body[:1] == "{" else "text/plain")
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def canned() -> Iterator[str]:
    bodies = {f"tgi {k}": v for k, v in TGI_BODIES.items()}
    bodies |= {f"chat {k}": v for k, v in CHAT_BODIES.items()}
    handler = type("Canned", (_Canned,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("body", sorted(TGI_BODIES))
def test_odd_tgi_events_read_the_same(canned: str, body: str) -> None:
    def make(lean: bool) -> ClientStream:
        client = InferenceClient(
            model=canned, api_key="-", timeout=10, headers={"X-Body": f"tgi {body}"}
        )
        return TextGenerationStream(client, PROMPT, lean=lean)

    reference, lean = _both(make)
    assert lean == reference


@pytest.mark.parametrize("body", sorted(CHAT_BODIES))
def test_odd_chat_events_read_the_same(canned: str, body: str) -> None:
    def make(lean: bool) -> ClientStream:
        client = InferenceClient(
            model=canned, api_key="-", timeout=10, headers={"X-Body": f"chat {body}"}
        )
        return ChatStream(client, CHAT, model="tgi", lean=lean)

    reference, lean = _both(make)
    assert lean == reference


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_body_framed_either_way_reads_the_same(canned: str, framing: str) -> None:
    headers = {"X-Body": "tgi plain", "X-Framing": framing}

    def make(lean: bool) -> ClientStream:
        client = InferenceClient(model=canned, api_key="-", timeout=10, headers=headers)
        return TextGenerationStream(client, PROMPT, lean=lean)

    reference, lean = _both(make)
    assert lean == reference and reference[0] == "done"


REFUSALS = {
    "tgi overloaded": (
        429,
        json.dumps({"error": "Model is overloaded", "error_type": "overloaded"}),
    ),
    "tgi validation": (422, json.dumps({"error": "bad input", "error_type": "validation"})),
    "tgi incomplete": (
        500,
        json.dumps({"error": "Incomplete generation", "error_type": "incomplete_generation"}),
    ),
    "422 without a type": (422, json.dumps({"error": "no type"})),
    "openai error body": (400, json.dumps({"error": {"message": "bad", "type": "invalid"}})),
    "plain text 503": (503, "upstream went away"),
    "empty 502": (502, ""),
    "404": (404, "Not Found"),
    "401": (401, json.dumps({"error": "who are you"})),
}


@pytest.mark.parametrize("kind", ["tgi", "chat"])
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusals_raise_the_same(canned: str, refusal: str, kind: str) -> None:
    status, body = REFUSALS[refusal]
    headers = {"X-Status": str(status), "X-Refusal": body}

    def make(lean: bool) -> ClientStream:
        client = InferenceClient(model=canned, api_key="-", timeout=10, headers=headers)
        if kind == "tgi":
            return TextGenerationStream(client, PROMPT, lean=lean)
        return ChatStream(client, CHAT, model="tgi", lean=lean)

    reference, lean = _both(make)
    assert lean == reference and reference[0] == "error"


def test_a_redirect_is_followed_as_huggingface_hub_follows_it(canned: str) -> None:
    """The lean connection leaves it to huggingface_hub, which sends the request again."""
    headers = {"X-Status": "307", "X-Body": "tgi plain"}

    def make(lean: bool) -> ClientStream:
        client = InferenceClient(model=canned, api_key="-", timeout=10, headers=headers)
        return TextGenerationStream(client, PROMPT, lean=lean)

    reference, lean = _both(make)
    assert lean == reference


def test_a_closed_port_fails_the_same() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    def make(lean: bool) -> ClientStream:
        return TextGenerationStream(
            InferenceClient(model=url, api_key="-", timeout=5), PROMPT, lean=lean
        )

    reference, lean = _both(make)
    assert lean == reference and reference[3] == "connection"


@pytest.mark.parametrize("when", ["before the first token", "between tokens"])
def test_a_silent_backend_times_out_the_same(sim_url: str, slow_sim_url: str, when: str) -> None:
    """The client's timeout bounds each wait for the backend (no answer, then no event)."""
    if when == "before the first token":
        headers, url = {"X-Sim-Error": "stall", "X-Sim-Stall-Ms": "3000"}, sim_url
    else:
        headers, url = {}, slow_sim_url

    def make(lean: bool) -> ClientStream:
        client = InferenceClient(model=url, api_key="-", timeout=1, headers=headers)
        return TextGenerationStream(client, PROMPT, lean=lean)

    reference, lean = _both(make)
    assert lean == reference


@pytest.mark.parametrize("answer", ["prefill", "up to the close"])
def test_an_abort_fails_a_blocked_read_at_once(sim_url: str, canned: str, answer: str) -> None:
    """A cancel during the backend's prefill: the read blocked in the stream's thread fails;
    also on an answer delimited by the connection's close, whose socket http.client hands to
    the response."""
    url, headers = sim_url, {"X-Sim-Error": "stall", "X-Sim-Stall-Ms": "20000"}
    if answer == "up to the close":
        url, headers = canned, {"X-Body": "tgi plain", "X-Framing": "close, stalled"}
    for lean in (False, True):
        client = InferenceClient(model=url, api_key="-", timeout=60, headers=headers)
        stream = TextGenerationStream(client, PROMPT, lean=lean)
        threading.Timer(0.5, stream.abort).start()
        started = time.monotonic()
        with pytest.raises(BackendError):
            list(stream)
        assert time.monotonic() - started < 5, lean
    # On the stream loop.
    client = InferenceClient(model=url, api_key="-", timeout=60, headers=headers)
    stream = TextGenerationStream(client, PROMPT)
    request = stream.lean_request()
    assert request is not None
    relay = _ENGINE.relay(stream, request, 60, _Collected())
    threading.Timer(0.5, relay.abort).start()
    started = time.monotonic()
    with pytest.raises(httpx2.ReadError):
        relay.wait()
    assert time.monotonic() - started < 5


def test_the_plain_streams_stay_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual events never reach huggingface_hub's parser (else nothing was gained)."""
    from workers.backends import sse

    def refuse(*_: object) -> None:
        raise AssertionError("fell back to huggingface_hub's parser")

    monkeypatch.setattr(sse, "_format_text_generation_stream_output", refuse)
    monkeypatch.setattr(sse, "_format_chat_completion_stream_output", refuse)
    tgi = list(map(sse.tgi_chunk, sse.data_lines(TGI_BODIES["plain"].splitlines())))
    assert [c.text for c in tgi] == ["a", " b", None]
    assert tgi[-1].details == sse.Details("length", 3, 5)
    chat = list(map(sse.chat_chunk, sse.data_lines(CHAT_BODIES["plain"].splitlines())))
    assert [c.choices for c in chat][:2] == [
        [sse.Choice("hi", None)],
        [sse.Choice(" there", "stop")],
    ]
    assert chat[2].usage == (4, 2)


@pytest.mark.parametrize(
    "text",
    [
        '{"token": {"text": "a\\ud800"}}',  # a lone surrogate
        '{"logprob": NaN}',
        '{"logprob": 1e400}',
        '{"a": 1, "a": 2}',
        ' {"text": "caf\u00e9\\u0000"} ',
    ],
)
def test_an_event_is_decoded_as_json_decodes_it(text: str) -> None:
    """orjson parses the events; where it refuses what `json` reads, `json` does. (An
    integer past 64 bits orjson reads as a float: the fast path takes counts only as
    integers, so such an event goes to huggingface_hub, the "past 64 bits" bodies above.)"""
    from workers.backends import sse

    decoded = sse._object("data:" + text)
    assert decoded == json.loads(text)
    assert repr(decoded) == repr(json.loads(text))  # an integer stays one, a float a float


# The body's framing, undone by the lean reader itself ------------------------------------------

EVENTS = 'data: {"token": {"text": "caf\u00e9 \u2028"}}\r\n\r\ndata: [DONE]\n\n'.encode()


def _chunked(data: bytes, cuts: list[int]) -> bytes:
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return b"".join(b"%X;ext=1\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def _read_in(data: bytes, size: int) -> Any:
    """`read1` over `data`, at most `size` bytes a call (a socket's reads)."""
    stream = io.BytesIO(data)
    return lambda n: stream.read(min(n, size))


def test_events_split_anywhere_read_the_same() -> None:
    whole = list(sse._lines(sse._unchunked(_read_in(_chunked(EVENTS, []), 1 << 16)), "utf-8"))
    assert whole == ['data: {"token": {"text": "café ', '"}}', "", "data: [DONE]", ""]
    for cut in range(1, len(EVENTS)):
        for size in (1, 7, 1 << 16):
            body = _chunked(EVENTS, [cut])
            assert list(sse._lines(sse._unchunked(_read_in(body, size)), "utf-8")) == whole


def test_trailers_are_read_to_their_blank_line() -> None:
    body = b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
    stream = io.BytesIO(body)
    assert list(sse._unchunked(stream.read)) == [b"hello"]
    assert stream.tell() == len(body)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [b"-1", b"-3", b"zz", b""])
def test_a_chunk_size_that_is_no_size_fails_the_read(size: bytes) -> None:
    """(A negative size once looped forever, reading nothing.)"""
    body = b"5\r\nhello\r\n" + size + b"\r\nabcdef\r\n0\r\n\r\n"
    with pytest.raises(http.client.IncompleteRead):
        list(sse._unchunked(io.BytesIO(body).read))


def test_a_long_line_read_in_small_pieces_is_whole() -> None:
    line = b"data: " + b"x" * (1 << 22)
    assert list(
        sse._lines(iter([line[i : i + 1400] for i in range(0, len(line), 1400)] + [b"\n"]), "utf-8")
    ) == [line.decode()]
