"""The web console at `/`, driven in a real headless Chromium (the system's, by Playwright).

Each browser test fails on any error the page throws or logs. Screenshots of each page go
to the test's temporary folder.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from inferq.db import make_sync_engine
from inferq.models import Evaluation
from tests.conftest import Platform, submit, wait_for
from tests.servers import free_port, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra)")

WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
TIMEOUT_MS = 30_000

# Records each change of the playground's output and run state.
RECORD_OUTPUT = """
() => {
  window.__steps = [];
  const output = document.querySelector('#output');
  const state = document.querySelector('#run-state');
  const observer = new MutationObserver(() => window.__steps.push(
    {length: output.textContent.length, state: state.textContent}
  ));
  for (const node of [output, state]) {
    observer.observe(node, {childList: true, characterData: true, subtree: true});
  }
}
"""

# The first event stream the page opens breaks after its first chunk, as a dropped
# connection would; every request for events is recorded with its Last-Event-ID.
DROP_FIRST_STREAM = """
(() => {
  const realFetch = window.fetch.bind(window);
  window.__eventRequests = [];
  let dropped = false;
  window.fetch = async (input, init = {}) => {
    const url = String(input);
    if (!url.includes('/events')) return realFetch(input, init);
    const headers = new Headers(init.headers || {});
    window.__eventRequests.push(headers.get('Last-Event-ID'));
    const response = await realFetch(input, init);
    if (dropped || response.status !== 200) return response;
    dropped = true;
    const reader = response.body.getReader();
    let chunks = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const {value, done} = await reader.read();
        if (done) return controller.close();
        controller.enqueue(value);
        chunks += 1;
        if (chunks === 2) {
          reader.cancel();
          controller.error(new TypeError('network error'));
        }
      },
    });
    return new Response(body, {status: 200, headers: response.headers});
  };
})();
"""

CANVAS_HAS_INK = """
(selector) => {
  const canvas = document.querySelector(selector);
  if (!canvas || canvas.width === 0) return false;
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
  return false;
}
"""

NO_OVERFLOW = "() => document.documentElement.scrollWidth <= window.innerWidth"

# Every visible element that holds text, with its WCAG 2 contrast ratio against the first
# opaque background behind it, where the ratio is below AA's (4.5, or 3 for large text).
LOW_CONTRAST = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    const style = getComputedStyle(el);
    if (!own || !el.getClientRects().length || style.visibility === "hidden") continue;
    if (el.disabled || el.closest("[disabled]")) continue;  // WCAG exempts inactive controls
    const [a, b] = [lum(rgb(style.color).slice(0, 3)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
    const large = size >= 24 || (bold && size >= 18.66);
    const text = el.textContent.trim().slice(0, 30);
    if (ratio < (large ? 3 : 4.5)) low.push(`${el.tagName} "${text}" ${ratio.toFixed(2)}`);
  }
  return low;
}"""


@dataclass
class Console:
    page: Any
    api_url: str
    key: str
    shots: Path
    problems: list[str] = field(default_factory=list)
    # Messages a test expects (an API error it provokes); anything else is a failure.
    allowed: tuple[str, ...] = ()

    def open(self, section: str = "playground") -> None:
        self.page.goto(f"{self.api_url}/#/{section}")

    def use_key(self, secret: str | None = None) -> None:
        page = self.page
        page.fill("#key-input", secret or self.key)
        page.click("#key-save")

    def wait_ready(self) -> None:
        sync_api.expect(self.page.locator("#key-state")).to_contain_text("in use")
        self.page.wait_for_function("() => document.querySelector('#model').options.length > 0")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(a in p for a in self.allowed)]

    def run(self, model: str, prompt: str, max_tokens: int) -> None:
        page = self.page
        page.select_option("#model", model)
        page.fill("#prompt", prompt)
        page.fill("#max-tokens", str(max_tokens))
        page.click("#submit")

    def job_id(self) -> str:
        link = self.page.locator("#run-result a.job-link")
        link.wait_for()
        return link.inner_text()

    def ended(self, state: str = "succeeded") -> None:
        """Wait until the playground shows the run ended in `state`."""
        sync_api.expect(self.page.locator("#run-state")).to_have_text(state)

    def stored(self, tenant: httpx.Client, state: str = "succeeded") -> dict[str, Any]:
        """The playground's job as the API stores it, once the page shows it ended."""
        self.ended(state)
        return wait_for(tenant, self.job_id())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def tenant_key(platform: Platform) -> str:
    """A tenant of its own, so that the dashboard's figures are this module's jobs."""
    return platform.new_key(f"console-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def tenant(platform: Platform, tenant_key: str) -> Iterator[httpx.Client]:
    with platform.client(tenant_key) as client:
        yield client


def _console(browser: Any, platform: Platform, key: str, tmp_path: Path, viewport: dict) -> Any:
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    console = Console(page, platform.api_url, key, tmp_path)
    page.on("pageerror", lambda error: console.problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            console.problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "assert")
            else None
        ),
    )
    return context, console


@pytest.fixture
def console(browser: Any, platform: Platform, tenant_key: str, tmp_path: Path) -> Iterator[Console]:
    context, console = _console(browser, platform, tenant_key, tmp_path, WIDE)
    console.open()
    console.use_key()
    console.wait_ready()
    yield console
    context.close()
    assert not console.unexpected()


@pytest.fixture
def phone(browser: Any, platform: Platform, tenant_key: str, tmp_path: Path) -> Iterator[Console]:
    context, console = _console(browser, platform, tenant_key, tmp_path, PHONE)
    console.open()
    console.use_key()
    console.wait_ready()
    yield console
    context.close()
    assert not console.unexpected()


def test_the_console_is_served_with_a_strict_policy_and_outside_the_schema(
    platform: Platform,
) -> None:
    page = httpx.get(f"{platform.api_url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # no inline script: the policy would refuse it
    script = httpx.get(f"{platform.api_url}/console/app.js", timeout=10)
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.headers["content-security-policy"] == policy
    missing = httpx.get(f"{platform.api_url}/console/nothing.js", timeout=10)
    assert missing.status_code == 404
    document = httpx.get(f"{platform.api_url}/openapi.json", timeout=10).json()
    assert not [p for p in document["paths"] if p == "/" or p.startswith("/console")]
    for path in ("/docs", "/healthz", "/metrics"):
        assert httpx.get(f"{platform.api_url}{path}", timeout=10).status_code == 200, path


def test_tokens_arrive_in_the_playground_as_they_are_generated(
    console: Console, tenant: httpx.Client
) -> None:
    page = console.page
    page.evaluate(RECORD_OUTPUT)
    console.run("slow", f"Tell a story {uuid.uuid4().hex}", 60)
    job = console.stored(tenant)
    assert page.locator("#output").text_content() == job["output"]
    steps = page.evaluate("window.__steps")
    before_done = {s["length"] for s in steps if s["length"] > 0 and s["state"] != "succeeded"}
    assert len(before_done) >= 2, steps  # the output grew while the job ran
    result = page.locator("#run-result")
    sync_api.expect(result).to_contain_text("Output tokens")
    sync_api.expect(result).to_contain_text(str(job["usage"]["output_tokens"]))
    sync_api.expect(result).to_contain_text("Time to first token")
    console.shot("playground")


def test_a_chat_job_streams_too(console: Console, tenant: httpx.Client) -> None:
    page = console.page
    page.check("input[name=mode][value=chat]")
    page.locator("#messages .message-content").last.fill(f"Hello {uuid.uuid4().hex}")
    page.select_option("#model", "sim")
    page.click("#submit")
    job = console.stored(tenant)
    assert job["output"] and page.locator("#output").text_content() == job["output"]


def test_cancel_stops_a_long_job(console: Console, tenant: httpx.Client) -> None:
    page = console.page
    console.run("slow", f"A very long tale {uuid.uuid4().hex}", 400)
    page.wait_for_function("() => document.querySelector('#output').textContent.length > 0")
    page.click("#cancel")
    job = console.stored(tenant, "cancelled")
    assert job["status"] == "cancelled"
    assert job["usage"]["output_tokens"] < 400
    assert page.locator("#output").text_content() == job["output"]
    console.shot("cancelled")


def test_the_stream_resumes_after_a_dropped_connection(
    console: Console, tenant: httpx.Client
) -> None:
    page = console.page
    page.evaluate(DROP_FIRST_STREAM)
    console.run("slow", f"Resume me {uuid.uuid4().hex}", 40)
    job = console.stored(tenant)
    assert page.locator("#output").text_content() == job["output"]
    requests = page.evaluate("window.__eventRequests")
    assert len(requests) >= 2 and requests[0] is None
    assert requests[1], "the reconnect did not send Last-Event-ID"


@pytest.mark.timeout(180)
def test_the_console_resumes_a_stream_across_an_api_restart(
    browser: Any, platform: Platform, tenant_key: str, tenant: httpx.Client, tmp_path: Path
) -> None:
    """The API serving the page stops mid-job and comes back on the same address: the
    console retries until it answers and resumes after the last event it had."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = platform.spawn("api", "--port", str(port), name="api-console-first")
    wait_http(f"{url}/readyz", first)
    context, console = _console(browser, platform, tenant_key, tmp_path, WIDE)
    console.api_url = url
    # While the API is down, the browser logs each refused connection.
    console.allowed = ("ERR_CONNECTION_REFUSED", "ERR_EMPTY_RESPONSE")
    page = console.page
    console.open()
    console.use_key()
    console.wait_ready()
    console.run("slow", f"Outlive the API {uuid.uuid4().hex}", 300)
    page.evaluate(RECORD_OUTPUT)
    page.wait_for_function("() => document.querySelector('#output').textContent.length > 0")
    first.terminate()
    first.popen.wait(timeout=30)
    second = platform.spawn("api", "--port", str(port), name="api-console-second")
    wait_http(f"{url}/readyz", second)
    sync_api.expect(page.locator("#run-state")).to_have_text("succeeded", timeout=60_000)
    job = wait_for(tenant, console.job_id())
    assert page.locator("#output").text_content() == job["output"]
    states = [step["state"] for step in page.evaluate("window.__steps")]
    assert any("reconnecting" in state for state in states), states
    context.close()
    second.stop()
    assert not console.unexpected()


# The same event stream cut into chunks at every awkward place: a CRLF split in two, a
# field split mid-name, comments (keep-alives), multi-line data, an id with no data.
PARSE_IN_CHUNKS = """
async (chunks) => {
  const { SseParser } = await import('./console/sse.js');
  const events = [];
  const parser = new SseParser((event) => events.push(event));
  for (const chunk of chunks) parser.push(chunk);
  return { events, lastEventId: parser.lastEventId, retry: parser.retry };
}
"""
STREAM = (
    "\ufeff: ping\r\n\r\n"
    "retry: 1500\n"
    'id: 1-0\r\nevent: status\r\ndata: {"status":"running"}\r\n\r\n'
    'id: 1-1\nevent: token\ndata:{"text":"a"}\n\n'
    ": keep-alive\n\n"
    "id: 1-2\revent: token\rdata: line one\rdata: line two\r\r"
    "id: 1-3\n\n"
    "event: done\ndata\n\n"
    "id: 1-4\nevent: ignored-without-its-blank-line\ndata: x"
)


def test_the_event_parser_reads_the_format_in_any_chunking(console: Console) -> None:
    expected = [
        {"type": "status", "data": '{"status":"running"}', "id": "1-0"},
        {"type": "token", "data": '{"text":"a"}', "id": "1-1"},
        {"type": "token", "data": "line one\nline two", "id": "1-2"},
        {"type": "done", "data": "", "id": "1-3"},
    ]
    for size in (1, 2, 3, 7, len(STREAM)):
        chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
        parsed = console.page.evaluate(PARSE_IN_CHUNKS, chunks)
        assert parsed["events"] == expected, size
        assert parsed["lastEventId"] == "1-3"
        assert parsed["retry"] == 1500


def test_feedback_given_in_the_console_is_on_the_job(
    console: Console, tenant: httpx.Client, platform: Platform
) -> None:
    page = console.page
    console.run("sim", f"Rate me {uuid.uuid4().hex}", 24)
    console.ended()
    job_id = console.job_id()
    box = page.locator("#run-result .feedback-box")
    box.get_by_role("button", name="Thumbs up").click()
    box.get_by_label("Comment").fill("crisp and short")
    box.get_by_role("button", name="Send feedback").click()
    sync_api.expect(box.locator(".feedback-state")).to_have_text("Thanks, feedback saved.")
    job = tenant.get(f"/v1/jobs/{job_id}").json()
    assert job["feedback"]["rating"] == 1
    assert job["feedback"]["comment"] == "crisp and short"

    page.click("#run-result a.job-link")
    sync_api.expect(page.locator("#job-title")).to_have_text(f"Job {job_id}")
    sync_api.expect(page.locator("#job-feedback")).to_contain_text("crisp and short")
    sync_api.expect(page.locator("#job-events tr").last).to_contain_text("done")
    console.shot("job")

    # A judge's score, once recorded, shows on the job beside the feedback.
    with make_sync_engine(platform.database_url).begin() as conn:
        conn.execute(
            insert(Evaluation).values(
                job_id=uuid.UUID(job_id),
                judge_model="sim",
                score=4,
                rationale="answers the request briefly",
                judged_at=datetime.now(UTC),
            )
        )
    page.reload()
    sync_api.expect(page.locator("#job-feedback")).to_contain_text("answers the request briefly")
    sync_api.expect(page.locator("#job-feedback")).to_contain_text("4/5 (sim)")


def test_a_job_opened_from_the_list_shows_its_output_and_replayed_events(
    console: Console, tenant: httpx.Client
) -> None:
    done = wait_for(
        tenant, submit(tenant, prompt=f"Listed {uuid.uuid4().hex}", max_tokens=16)["id"]
    )
    page = console.page
    page.click("a[data-tab=jobs]")
    link = page.locator(f"#jobs-rows a[href='#/jobs/{done['id']}']")
    link.click()
    sync_api.expect(page.locator("#job-output")).to_have_text(done["output"])
    events = page.locator("#job-events tr")
    sync_api.expect(events.last).to_contain_text("done")
    tokens = page.locator("#job-events tr", has_text="token")
    assert tokens.count() >= 1
    sync_api.expect(page.locator("#job-detail")).to_contain_text("succeeded")
    console.shot("jobs-detail")


def test_the_jobs_list_pages_with_more_and_filters_by_status(
    console: Console, tenant: httpx.Client
) -> None:
    jobs = [submit(tenant, prompt=f"Page {i} {uuid.uuid4().hex}", max_tokens=4) for i in range(22)]
    cancelled = submit(tenant, model="slow", prompt=f"Stop {uuid.uuid4().hex}", max_tokens=400)
    assert tenant.post(f"/v1/jobs/{cancelled['id']}/cancel").status_code in (200, 202)
    for job in [*jobs, cancelled]:
        wait_for(tenant, job["id"])
    page = console.page
    page.click("a[data-tab=jobs]")
    rows = page.locator("#jobs-rows tr")
    sync_api.expect(rows).to_have_count(20)
    # Newest first: the last submitted is on top.
    sync_api.expect(rows.first).to_contain_text(cancelled["id"])
    page.click("#jobs-more")
    page.wait_for_function("() => document.querySelectorAll('#jobs-rows tr').length > 20")
    page.select_option("#jobs-status", "cancelled")
    sync_api.expect(page.locator("#jobs-rows .badge:not(.status-cancelled)")).to_have_count(0)
    sync_api.expect(rows.first).to_contain_text(cancelled["id"])
    console.shot("jobs")


def test_the_dashboard_draws_charts_from_the_stats(
    console: Console, tenant: httpx.Client, platform: Platform
) -> None:
    jobs = [
        submit(tenant, prompt=f"Stats {i} {uuid.uuid4().hex}", max_tokens=8, user=f"user-{i % 2}")
        for i in range(4)
    ]
    for job in jobs:
        wait_for(tenant, job["id"])
    page = console.page
    page.click("a[data-tab=dashboard]")
    for chart in ("chart-jobs", "chart-ttft", "chart-cost", "chart-rates"):
        canvas = f"#{chart} canvas"
        page.locator(canvas).wait_for()
        page.wait_for_function(CANVAS_HAS_INK, arg=canvas)
    tiles = page.locator("#summary .tile")
    jobs_tile = tiles.filter(has_text="jobs").first.locator(".tile-value")
    assert int(jobs_tile.inner_text().replace(",", "")) >= len(jobs)
    sync_api.expect(page.locator("#chart-cost")).to_contain_text("user-1")
    sync_api.expect(page.locator("#chart-ttft")).to_contain_text("sim p95")
    console.shot("dashboard")


def test_an_api_error_shows_in_the_banner_and_forget_clears_the_key(
    browser: Any, platform: Platform, tenant_key: str, tmp_path: Path
) -> None:
    context, console = _console(browser, platform, tenant_key, tmp_path, WIDE)
    # The browser logs each refused request; those are the point of this test.
    console.allowed = ("status of 401",)
    page = console.page
    console.open()
    sync_api.expect(page.locator("#key-state")).to_contain_text("No key")
    console.use_key("iq_not_a_real_key_000000000000")
    banner = page.locator("#banner")
    sync_api.expect(banner).to_be_visible()
    sync_api.expect(banner).to_contain_text("key")
    console.shot("bad-key")
    page.click("#banner-close")
    sync_api.expect(banner).to_be_hidden()

    page.check("#key-remember")
    console.use_key()
    console.wait_ready()
    assert page.evaluate("localStorage.getItem('inferq.key')") == tenant_key
    assert tenant_key not in page.url
    page.click("#key-forget")
    sync_api.expect(page.locator("#key-state")).to_contain_text("No key")
    assert page.evaluate("localStorage.getItem('inferq.key')") is None
    assert page.evaluate("sessionStorage.getItem('inferq.key')") is None
    context.close()
    assert not console.unexpected()


def test_every_page_has_readable_contrast(console: Console, tenant: httpx.Client) -> None:
    """WCAG AA contrast for the text of every page, the finished playground included."""
    done = wait_for(
        tenant, submit(tenant, prompt=f"Contrast {uuid.uuid4().hex}", max_tokens=8)["id"]
    )
    page = console.page
    console.run("sim", f"Readable {uuid.uuid4().hex}", 16)
    console.ended()
    assert page.evaluate(LOW_CONTRAST) == [], "the playground"
    for section in ("jobs", f"jobs/{done['id']}", "dashboard"):
        page.goto(f"{console.api_url}/#/{section}")
        page.wait_for_load_state("networkidle")
        assert page.evaluate(LOW_CONTRAST) == [], f"#/{section}"


def test_the_console_works_from_the_keyboard(
    browser: Any, platform: Platform, tenant_key: str, tmp_path: Path
) -> None:
    """Paste the key, pick a section and submit with keys alone; focus is always visible."""
    context, console = _console(browser, platform, tenant_key, tmp_path, WIDE)
    page = console.page
    console.open()
    page.focus("#key-input")
    page.keyboard.type(tenant_key)
    page.keyboard.press("Enter")
    console.wait_ready()
    page.focus("#max-tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("8")
    page.keyboard.press("Enter")  # submits the form
    console.ended()
    page.focus("a[data-tab=playground]")
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "() => [document.activeElement.dataset.tab,"
        " getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused[0] == "jobs" and focused[1] != "none", focused
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#jobs-rows tr").first).to_be_visible()
    context.close()
    assert not console.unexpected()


def test_at_phone_width_no_page_overflows_sideways(
    phone: Console, tenant: httpx.Client, platform: Platform
) -> None:
    done = wait_for(tenant, submit(tenant, prompt=f"Phone {uuid.uuid4().hex}", max_tokens=16)["id"])
    page = phone.page
    phone.run("sim", f"Small screen {uuid.uuid4().hex}", 32)
    phone.ended()
    assert page.evaluate(NO_OVERFLOW), "the playground is wider than the phone"
    phone.shot("phone-playground")
    for section in ("jobs", f"jobs/{done['id']}", "dashboard"):
        page.goto(f"{phone.api_url}/#/{section}")
        page.wait_for_load_state("networkidle")
        if section == "dashboard":
            page.locator("#chart-jobs canvas").wait_for()
        assert page.evaluate(NO_OVERFLOW), f"#/{section} is wider than the phone"
        phone.shot(f"phone-{section.replace('/', '-')}")
