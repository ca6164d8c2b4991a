"""`inferq bench`: what the platform costs over its backend, measured side by side.

Modules: `config` (sizes and simulator parameters), `servers` and `cluster` (Postgres, Redis
and the platform's processes), `clients` (one timed request), one module per phase
(`stream`, `submit`, `fanout` with `fanout_clients`, `scale`), `stats`, `monitor` (CPU and
memory), `environment`, `report` (JSON, tables, chart), `runner` and `command`.
"""
