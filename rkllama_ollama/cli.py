"""The `rkllama-ollama` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rkllama_ollama import __version__
from rkllama_ollama.config import ConfigError, Settings, parse_host, settings_from_env

log = logging.getLogger("rkllama_ollama")


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from rkllama_ollama.daemon import run_daemon

    if args.host:
        host, port = parse_host(args.host) if ":" in args.host else (args.host, settings.port)
        settings = settings.with_overrides(host=host, port=port)
    models = Path(args.models).expanduser() if args.models else None
    settings = settings.with_overrides(port=args.port, models_dir=models)
    _configure_logging(settings)
    return run_daemon(settings)


def cmd_version(args: argparse.Namespace, settings: Settings) -> int:
    print(f"rkllama-ollama version {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rkllama-ollama", description="Ollama-compatible daemon for Rockchip NPUs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the daemon")
    serve.add_argument("--host", help="address to bind (host or host:port); default 127.0.0.1")
    serve.add_argument("--port", type=int, help="port to bind; default 11434")
    serve.add_argument("--models", help="model store folder; default ~/RKLLAMA/models")
    serve.set_defaults(func=cmd_serve)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_env()
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"rkllama-ollama: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
