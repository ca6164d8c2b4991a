"""Fair share between tenants on one queue: a tenant's recent load lowers its jobs' priority.

Each (queue, tenant) has a load in Redis: the jobs it enqueued, decaying exponentially with
time. A job of a light tenant keeps the priority it asked for; a heavier tenant's jobs go one
Redis priority lower per doubling of its load, so a flood waits behind everyone else's work
instead of in front of it. The job's own `priority` field is not changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from inferq.resp import RespLink, pack

# Jobs a tenant may have enqueued recently and still keep its priority: about one wave of a
# worker's slots, so a tenant's ordinary burst is not demoted.
LIGHT_LOAD = 8
# Steps below the asked priority at most: interactive 0..5, batch 6..9 (see queue.redis_priority).
MAX_SHIFT = 5
# The load's time constant: a flood of 300 counts as light again about 35 s after it stopped.
DECAY_SECONDS = 10.0
KEY_TTL_SECONDS = 600  # an idle tenant's load is ~0 long before then

# KEYS[1]: the load; ARGV: now, jobs added, decay seconds, ttl. Returns the load before the
# new jobs, as a string (a Lua number would come back truncated to an integer).
LOAD_SCRIPT = """
local saved = redis.call('HMGET', KEYS[1], 'load', 'at')
local now = tonumber(ARGV[1])
local load = 0
if saved[1] and saved[2] then
  local age = math.max(0, now - tonumber(saved[2]))
  load = tonumber(saved[1]) * math.exp(-age / tonumber(ARGV[3]))
end
redis.call('HSET', KEYS[1], 'load', tostring(load + tonumber(ARGV[2])), 'at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return tostring(load)
"""


def load_key(queue: str, tenant: str) -> str:
    return f"inferq:load:{queue}:{tenant}"


def shift_for(load: float) -> int:
    """Priority steps to give up at this load: 0 while light, then one per doubling."""
    if load <= LIGHT_LOAD:
        return 0
    return min(MAX_SHIFT, 1 + int(math.log2(load / LIGHT_LOAD)))


async def shifts(link: RespLink, jobs: Sequence[tuple[str, str]]) -> list[int]:
    """The shift of each (queue, tenant) job, counting the earlier ones of the same batch.

    One round trip per batch on the lean connection, one script call per tenant in it.
    """
    groups: dict[tuple[str, str], int] = {}
    for job in jobs:
        groups[job] = groups.get(job, 0) + 1
    now = repr(time.time())
    calls = [
        pack(("EVAL", LOAD_SCRIPT, 1, load_key(*group), now, count, DECAY_SECONDS, KEY_TTL_SECONDS))
        for group, count in groups.items()
    ]
    # Run again after a lost connection, a batch's load may count twice: it decays anyway.
    loads = await link.run(calls, retry=True)
    before = dict(zip(groups, (float(v) for v in loads), strict=True))
    seen: dict[tuple[str, str], int] = {}
    result = []
    for job in jobs:
        seen[job] = seen.get(job, 0) + 1
        result.append(shift_for(before[job] + seen[job]))
    return result
