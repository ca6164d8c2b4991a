"""`inferq bench`: what the platform costs over its backend, measured side by side.

Modules: `config` (sizes and simulator parameters), `servers` and `cluster` (Postgres, Redis
and the platform's processes), `clients` (one timed request), one module per phase
(`stream`, `submit`, `fanout` with `fanout_clients`, `scale`), `stats`, `monitor` (CPU and
memory), `environment`, `report` (JSON, tables, chart), `runner` and `command`.
"""

# inferq's import turns Hugging Face telemetry off (see inferq/__init__.py), before any
# phase imports huggingface_hub, also when the bench runs as `python -m bench`.
import inferq  # noqa: F401
