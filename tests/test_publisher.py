"""The worker's flush pace: crisp while few streams run, bounded in flushes per second."""

from __future__ import annotations

from workers.publisher import FlushPace


def test_flushes_stretch_with_the_streams_of_the_process_and_no_further_than_the_cap() -> None:
    pace = FlushPace(base_s=0.02, budget=400, max_s=0.1)
    assert pace.interval() == 0.02
    with pace.streaming():
        assert pace.interval() == 0.02  # one stream: every 20 ms
        with pace.streaming(), pace.streaming():
            assert pace.active == 3
    assert pace.active == 0
    for _ in range(32):
        pace.active += 1
    assert pace.interval() == 32 / 400  # 400 flushes a second over 32 streams
    pace.active = 1000
    assert pace.interval() == 0.1
