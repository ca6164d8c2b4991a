"""Python's cyclic garbage collector kept off the hot paths of long-running processes."""

from __future__ import annotations

import gc


def quiet_collector() -> None:
    """Move everything imported and built at start-up out of the collector's view, and
    collect the youngest generation after 50,000 allocations instead of 700.

    The API's open streams and the worker's stream loop allocate a little per event, and a
    full pass of the collector over a process's objects cost more than the events
    themselves: in the API, per event (docs/performance.md); in a worker, a pause of the
    stream loop that reads and writes every stream of the process, which showed as the
    slowest times to first token. Reference counting still frees almost everything at once;
    the collector only finds cycles, now less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
