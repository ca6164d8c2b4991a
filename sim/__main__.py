"""`python -m sim`: run the simulator from the command line."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from sim import SimConfig, serve


def build_parser() -> argparse.ArgumentParser:
    """One flag per `SimConfig` field, plus host and port."""
    parser = argparse.ArgumentParser(
        prog="inferq sim", description="TGI-compatible simulated inference server"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    for field in dataclasses.fields(SimConfig):
        # Optional settings are the optional token counts, hence `int`.
        kind = int if field.default is None else type(field.default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            default=field.default,
            help=f"{field.metadata.get('help', '')} (default: {field.default})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and serve until interrupted."""
    args = vars(build_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    try:
        config = SimConfig(**args)
    except ValueError as exc:
        raise SystemExit(f"invalid settings: {exc}") from None
    serve(config, host=host, port=port)


if __name__ == "__main__":
    main()
