"""Submit and poll through the real API, worker and simulator."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import psycopg
import pytest

from inferq.events import (
    PUBLISH_SCRIPT,
    channel,
    script_args,
    script_keys,
)
from inferq.lifecycle import Outcome
from inferq.models import JobStatus
from tests.conftest import BOOTSTRAP_KEY, Platform, submit, wait_for
from tests.servers import free_port, redis_client, wait_http
from tests.sse import Transcript, read


def test_submit_poll_succeeds_with_simulator_text(platform: Platform, http: httpx.Client) -> None:
    job = submit(http, prompt="Tell me about queues", max_tokens=40, seed=7)
    assert job["status"] == "queued"
    assert job["links"]["events"] == f"/v1/jobs/{job['id']}/events"
    done = wait_for(http, job["id"])
    expected = platform.sims["fast"].generate("Tell me about queues", 40, seed=7)
    assert done["status"] == "succeeded", done
    assert done["output"] == expected["generated_text"]
    assert done["usage"]["output_tokens"] == expected["details"]["generated_tokens"]
    assert done["usage"]["input_tokens"] == 4
    cost = (4 * 0.25 + done["usage"]["output_tokens"] * 1.25) / 1e6
    assert done["usage"]["cost_usd"] == pytest.approx(cost)
    assert done["finish_reason"] in {"length", "stop"}
    timings = done["timings"]
    assert 0 <= timings["queue_ms"] <= timings["ttft_ms"] <= timings["duration_ms"]
    assert timings["tokens_per_second"] > 0
    assert done["attempts"] == 1


def test_messages_job_runs_on_the_messages_api(http: httpx.Client) -> None:
    job = submit(
        http,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ],
        max_tokens=12,
    )
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["output"]
    assert done["usage"]["output_tokens"] >= 1


def test_max_tokens_is_clamped_to_the_model_cap(http: httpx.Client) -> None:
    job = submit(http, model="faulty", prompt="clamp me", max_tokens=5000)
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded"
    assert done["usage"]["output_tokens"] <= 64


def test_same_idempotency_key_and_body_returns_the_same_job(
    http: httpx.Client, platform: Platform
) -> None:
    key = platform.new_key("idem-tenant")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-42"}
    body = {"model": "sim", "prompt": "idempotent", "max_tokens": 5}
    first = http.post("/v1/jobs", json=body, headers=headers)
    again = http.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = http.post("/v1/jobs", json={**body, "prompt": "something else"}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "conflict"
    listed = http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()
    assert [j["id"] for j in listed["data"]] == [first.json()["id"]]


def test_another_tenants_job_is_not_found(http: httpx.Client, platform: Platform) -> None:
    job = submit(http, prompt="mine", max_tokens=3)
    stranger = platform.client(platform.new_key("stranger"))
    for response in (
        stranger.get(f"/v1/jobs/{job['id']}"),
        stranger.post(f"/v1/jobs/{job['id']}/cancel"),
        stranger.get(f"/v1/jobs/{job['id']}/events"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found"
    assert stranger.get("/v1/jobs").json()["data"] == []


def test_a_job_whose_events_were_read_stays_hidden_from_other_tenants(
    http: httpx.Client, platform: Platform
) -> None:
    """The API remembers a job's tenant once its events were read; the check must hold."""
    job = wait_for(http, submit(http, prompt="read me first", max_tokens=2)["id"])
    owner_read = read(http, job["id"], Transcript())
    assert owner_read.output() == job["output"]
    stranger = platform.client(platform.new_key("stranger-after-read"))
    response = stranger.get(f"/v1/jobs/{job['id']}/events")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert read(http, job["id"], Transcript()).output() == job["output"]  # still the owner's


def test_cancel_of_a_queued_job_is_immediate(http: httpx.Client) -> None:
    job = submit(http, model="parked", prompt="nobody serves this queue", max_tokens=5)
    response = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200  # idempotent
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_cancel_of_a_running_job_waits_for_its_end_on_the_event_channel(
    platform: Platform, http: httpx.Client
) -> None:
    """The API listens for the job's `done` (through its hub) instead of polling the row."""
    port = free_port()
    api = platform.spawn(
        "api", "--port", str(port), name="api-long-cancel-wait", INFERQ_CANCEL_WAIT_SECONDS="30"
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", api)
        # No worker serves `parked`: the test plays the worker that has claimed the job.
        job = submit(http, model="parked", prompt="held", max_tokens=4)
        with psycopg.connect(platform.database_url) as db:
            db.execute(
                "UPDATE jobs SET status = 'running', attempts = 1, started_at = now(),"
                " lease_expires_at = now() + interval '1 hour' WHERE id = %s",
                (job["id"],),
            )
        answer: list[httpx.Response] = []
        auth = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=60) as other:
            cancel = threading.Thread(
                target=lambda: answer.append(other.post(f"/v1/jobs/{job['id']}/cancel"))
            )
            cancel.start()
            _wait_for_listener(platform, job["id"])
            _end_as_cancelled(platform, job["id"])
            cancel.join(timeout=20)
        assert answer and answer[0].status_code == 200, answer
        assert answer[0].json()["status"] == "cancelled"
    finally:
        api.stop()


def _wait_for_listener(platform: Platform, job_id: str) -> None:
    redis = redis_client(platform.redis_url)
    deadline = time.monotonic() + 20  # the cancel waits 30 s
    while redis.pubsub_numsub(channel(job_id))[0][1] == 0:
        assert time.monotonic() < deadline, "the cancel does not listen for the job's end"
        time.sleep(0.05)


def _end_as_cancelled(platform: Platform, job_id: str) -> None:
    """What a worker does on a cancel: end the row, then publish the job's closing events."""
    with psycopg.connect(platform.database_url) as db:
        db.execute(
            "UPDATE jobs SET status = 'cancelled', finish_reason = 'cancelled',"
            " finished_at = now() WHERE id = %s",
            (job_id,),
        )
    cancelled = Outcome(
        JobStatus.cancelled,
        finish_reason="cancelled",
        input_tokens=0,
        output_tokens=0,
        cost_usd=0.0,
    )
    events = cancelled.closing_events()
    publish = redis_client(platform.redis_url).register_script(PUBLISH_SCRIPT)
    publish(keys=script_keys(job_id), args=script_args(events, 1000, 60))


def test_cancel_of_a_finished_job_conflicts(http: httpx.Client) -> None:
    job = wait_for(http, submit(http, prompt="quick", max_tokens=2)["id"])
    response = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409


def test_list_is_newest_first_with_cursor_and_status_filter(platform: Platform) -> None:
    client = platform.client(platform.new_key("lister"))
    ids = [submit(client, prompt=f"n{i}", max_tokens=2)["id"] for i in range(5)]
    for job_id in ids:
        wait_for(client, job_id)
    page = client.get("/v1/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:3]
    rest = client.get("/v1/jobs", params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][3:]
    assert rest["next_cursor"] is None
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_duplicate_delivery_is_skipped_by_the_worker(
    http: httpx.Client, platform: Platform
) -> None:
    from celery import Celery

    done = wait_for(http, submit(http, prompt="only once", max_tokens=5)["id"])
    app = Celery(broker=platform.redis_url)
    app.conf.broker_transport_options = {
        "sep": ":",
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    }
    app.send_task("inferq.generate", args=[done["id"]], queue=platform.queue("sim"))
    app.send_task("inferq.generate", args=[str(uuid.uuid4())], queue=platform.queue("sim"))
    again = submit(http, prompt="after the duplicates", max_tokens=2)
    assert wait_for(http, again["id"])["status"] == "succeeded"  # the worker moved past them
    after = http.get(f"/v1/jobs/{done['id']}").json()
    assert after["attempts"] == 1
    assert after["finished_at"] == done["finished_at"]
    assert after["output"] == done["output"]


def test_overloaded_backend_is_retried_then_succeeds(
    http: httpx.Client, platform: Platform
) -> None:
    sim = platform.sims["faulty"]
    before = sim.state()["total_requests"]
    sim.fault("overloaded", count=2)
    done = wait_for(http, submit(http, model="faulty", prompt="busy", max_tokens=8)["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert sim.state()["total_requests"] - before == 3


def test_backend_validation_error_fails_at_once(http: httpx.Client, platform: Platform) -> None:
    sim = platform.sims["faulty"]
    before = sim.state()["total_requests"]
    sim.fault("validation", count=1)
    done = wait_for(http, submit(http, model="faulty", prompt="invalid", max_tokens=8)["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "validation"
    assert "validation" in done["error"]["message"].lower()
    assert sim.state()["total_requests"] - before == 1


def test_backend_that_stays_down_fails_with_its_message(http: httpx.Client) -> None:
    done = wait_for(http, submit(http, model="down", prompt="anyone?", max_tokens=4)["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "connection"
    assert "unreachable" in done["error"]["message"]


def test_lost_enqueue_is_queued_again_by_the_sweeper(
    http: httpx.Client, platform: Platform
) -> None:
    """A job committed but never handed to the broker (an API crash) still runs."""
    job_id = _insert_job(platform, status="queued", attempts=0)
    done = wait_for(http, job_id, timeout=30)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1


def test_job_whose_worker_keeps_dying_fails_after_max_attempts(
    http: httpx.Client, platform: Platform
) -> None:
    job_id = _insert_job(platform, status="running", attempts=3, lease="now() - interval '1 s'")
    done = wait_for(http, job_id, timeout=30)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "worker_lost"
    assert "3 attempts" in done["error"]["message"]


def _insert_job(platform: Platform, status: str, attempts: int, lease: str = "NULL") -> str:
    job_id = str(uuid.uuid4())
    with psycopg.connect(platform.database_url.replace("+psycopg", ""), autocommit=True) as db:
        db.execute(
            "INSERT INTO jobs (id, tenant, requested_model, model, status, priority, input,"
            " params, attempts, metadata, created_at, lease_expires_at) VALUES (%s, 'default',"
            " 'sim', 'sim', %s, 'interactive', '{\"prompt\": \"orphan\"}',"
            " '{\"max_tokens\": 4}', %s, '{}', now() - interval '10 s', " + lease + ")",
            (job_id, status, attempts),
        )
    return job_id


def test_queue_depth_is_exported(platform: Platform, http: httpx.Client) -> None:
    for i in range(3):
        submit(http, model="parked", prompt=f"waiting {i}", max_tokens=2, priority="batch")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{platform.api_url}/metrics").text
        depth = [
            line
            for line in metrics.splitlines()
            if line.startswith(f'inferq_queue_depth{{queue="{platform.queue("parked")}"}}')
        ]
        if depth and float(depth[0].split()[-1]) >= 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"queue depth not exported: {depth}")


def test_prompt_and_message_jobs_share_one_finish_reason_vocabulary(
    platform: Platform, http: httpx.Client
) -> None:
    """TGI ends a prompt with `stop_sequence` or `eos_token` and a chat with `stop`; a job
    says `stop` for both, and `length` when max_tokens cut it."""
    full = platform.sims["fast"].generate("Name three queues", 20, seed=3)["generated_text"]
    stop = full.split()[2]
    prompt = submit(http, prompt="Name three queues", max_tokens=20, seed=3, stop=[stop])
    chat = submit(http, messages=[{"role": "user", "content": "Hi"}], max_tokens=200, seed=3)
    capped = submit(http, prompt="Name three queues", max_tokens=2, seed=3)
    reasons = [wait_for(http, job["id"])["finish_reason"] for job in (prompt, chat, capped)]
    assert reasons == ["stop", "stop", "length"]


def test_worker_logs_each_jobs_start_and_end_at_info(
    platform: Platform, http: httpx.Client
) -> None:
    job = submit(http, prompt="log me", max_tokens=3)
    wait_for(http, job["id"])
    deadline = time.monotonic() + 10
    while True:
        lines = [
            line
            for line in (platform.logs / "worker.log").read_text().splitlines()
            if job["id"] in line
        ]
        ended = [line for line in lines if '"status": "succeeded"' in line]
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any("started on sim" in line for line in lines), lines
    assert ended and '"output_tokens": 3' in ended[0] and '"ms":' in ended[0], lines
    assert "log me" not in "\n".join(lines)  # never a prompt's text


def test_polling_a_running_job_shows_the_output_so_far(
    platform: Platform, http: httpx.Client
) -> None:
    job = submit(http, model="slow", prompt="Tell a long story", max_tokens=120, seed=5)
    seen: list[dict] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        polled = http.get(f"/v1/jobs/{job['id']}").json()
        if polled["status"] == "running" and polled["output"]:
            seen.append(polled)
        if polled["status"] != "queued" and polled["status"] != "running":
            break
        time.sleep(0.1)
    done = wait_for(http, job["id"])
    assert len(seen) >= 2, "never saw the job running with partial output"
    for partial in seen:
        assert done["output"].startswith(partial["output"])
        assert 0 < partial["usage"]["output_tokens"] <= done["usage"]["output_tokens"]
    counts = [p["usage"]["output_tokens"] for p in seen]
    assert counts == sorted(counts) and counts[-1] > counts[0]
