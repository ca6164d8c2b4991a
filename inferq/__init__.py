"""inferq: a queue-backed inference platform.

huggingface_hub reads its settings when it is first imported, and with telemetry on it
fetches a registry from the Hub (a GET to huggingface.co, up to 3 s) to build the
User-Agent of a process's first request. No inferq process sends anything to the Hub, so
telemetry is turned off here, at the import every entry point (the API, the workers, the
CLI, the bench) goes through before any module imports the library. Set
HF_HUB_DISABLE_TELEMETRY=0 to have it back.
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
