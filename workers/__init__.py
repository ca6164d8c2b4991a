"""The worker side: the Celery app, the task body and the backends.

huggingface_hub reads its settings when it is first imported, and with telemetry on it
builds each request's User-Agent by fetching a registry from the Hub (a GET to
huggingface.co, up to 3 s, on the first request of every process). A worker talks only to
the model servers of its models file, so that call is turned off here, before any backend
imports the library. Set HF_HUB_DISABLE_TELEMETRY=0 to have it back.
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
