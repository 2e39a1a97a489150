"""The `rkllama-ollama` command: its subcommands and their arguments.

Only the client side loads at start-up (the CLI talks to a daemon over HTTP); `serve`, `doctor` and
`create` import the server modules they need inside the command (tests/test_layers.py checks it)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rkllama_ollama import __version__
from rkllama_ollama.cli.client import Client, DaemonError, DaemonUnreachable
from rkllama_ollama.cli.formatting import (
    PullProgress,
    human_bytes,
    human_time,
    parse_time,
    processor_text,
    short_id,
    show_info,
    table,
)
from rkllama_ollama.cli.repl import Session, is_terminal, run
from rkllama_ollama.config import ConfigError, Settings, parse_host, settings_from_env

log = logging.getLogger("rkllama_ollama")


class CommandError(Exception):
    """A problem found on this side (a missing or bad file); printed as `Error: <message>`."""


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


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from rkllama_ollama.doctor import run_doctor

    models = Path(args.models).expanduser() if args.models else settings.models_dir
    report = run_doctor(models, root=Path(args.root))
    sys.stdout.write(report.render())
    return report.exit_code


def cmd_version(args: argparse.Namespace, settings: Settings) -> int:
    print(f"rkllama-ollama version {__version__}")
    return 0


# ------------------------------------------------------------------------------------------------
# Client commands: they talk to the daemon at RKLLAMA_HOST / OLLAMA_HOST
# ------------------------------------------------------------------------------------------------


def client_for(settings: Settings) -> Client:
    return Client(settings.base_url, api_key=settings.api_key)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = [
        [
            str(m.get("name") or m.get("model") or ""),
            short_id(m.get("digest")),
            human_bytes(int(m.get("size") or 0)),
            human_time(parse_time(m.get("modified_at"))),
        ]
        for m in client_for(settings).tags()
    ]
    sys.stdout.write(table(["NAME", "ID", "SIZE", "MODIFIED"], rows))
    return 0


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    rows = []
    for m in client_for(settings).ps():
        size = int(m.get("size") or 0)
        until = human_time(parse_time(m.get("expires_at")))
        rows.append(
            [
                str(m.get("name") or m.get("model") or ""),
                short_id(m.get("digest")),
                human_bytes(size),
                processor_text(size, int(m.get("size_vram") or 0)),
                str(m.get("context_length") or ""),
                "Stopping..." if until.endswith(" ago") else until,
            ]
        )
    sys.stdout.write(table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    info = client_for(settings).show(args.model)
    for flag in ("modelfile", "parameters", "system", "template", "license"):
        if getattr(args, flag):
            text = str(info.get(flag) or "")
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
            return 0
    sys.stdout.write(show_info(info))
    return 0


def cmd_stop(args: argparse.Namespace, settings: Settings) -> int:
    try:
        _drain(client_for(settings).generate({"model": args.model, "keep_alive": 0, "stream": False}))
    except DaemonError as exc:
        if exc.not_found:
            raise DaemonError(f'couldn\'t find model "{args.model}" to stop', exc.status) from None
        raise
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    client = client_for(settings)
    for model in args.models:
        client.delete(model)
        print(f"deleted '{model}'")
    return 0


def cmd_cp(args: argparse.Namespace, settings: Settings) -> int:
    client_for(settings).copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def show_progress(events: Iterator[dict[str, Any]], out: TextIO) -> None:
    progress = PullProgress(out, interactive=is_terminal(out))
    try:
        for event in events:
            progress.update(event)
    finally:
        progress.close()


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    show_progress(client_for(settings).pull(args.model), sys.stdout)
    return 0


def weights_path(modelfile_path: Path, from_: str) -> Path | None:
    """The local weights file a Modelfile's FROM names (relative to the Modelfile), else None."""
    if not from_ or from_.startswith("@"):
        return None
    candidate = Path(from_).expanduser()
    if not candidate.is_absolute():
        candidate = modelfile_path.parent / candidate
    return candidate if candidate.is_file() else None


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    from rkllama_ollama.models.modelfile import ModelfileError, parse_modelfile
    from rkllama_ollama.models.store import sha256_file

    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        modelfile = parse_modelfile(text)
    except ModelfileError as exc:
        raise CommandError(f"{path}: {exc}") from None
    client = client_for(settings)
    body: dict[str, Any] = {"model": args.name, "modelfile": text}
    weights = weights_path(path, modelfile.from_)
    if weights is not None:
        print(f"gathering model components from {weights.name}")
        hex_digest = sha256_file(weights)
        if not client.blob_exists(hex_digest):
            client.upload_blob(hex_digest, weights)
            print(f"copying file sha256:{hex_digest} 100%")
        body["files"] = {weights.name: f"sha256:{hex_digest}"}
        encoder = weights_path(path, modelfile.projector) if modelfile.projector else None
        if encoder is not None:  # a vision model's image encoder (a second FROM / VISION_ENCODER=)
            encoder_digest = sha256_file(encoder)
            if not client.blob_exists(encoder_digest):
                client.upload_blob(encoder_digest, encoder)
                print(f"copying file sha256:{encoder_digest} 100%")
            body["files"][encoder.name] = f"sha256:{encoder_digest}"
    elif not modelfile.from_:
        raise CommandError(f"{path}: no FROM line")
    show_progress(client.create(body), sys.stdout)
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    client = client_for(settings)
    try:
        shown = client.show(args.model)
    except DaemonError as exc:
        if exc.status != 404:
            raise
        show_progress(client.pull(args.model), sys.stderr)
        shown = client.show(args.model)
    session = Session(
        client=client,
        model=args.model,
        out=sys.stdout,
        verbose=args.verbose,
        keep_alive=args.keepalive,
        color=is_terminal(sys.stdout),
        vision="vision" in (shown.get("capabilities") or []),
    )
    if not args.prompt and is_terminal(sys.stdin):
        # Load the model before the first prompt, like `ollama run`.
        _drain(client.chat({"model": args.model, "messages": [], "keep_alive": args.keepalive}))
    return run(session, args.prompt)


def _drain(events: Iterator[dict[str, Any]]) -> None:
    for _ in events:
        pass


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
    doctor = sub.add_parser(
        "doctor", help="check this board: NPU, driver, runtime, models (exit 1 if one cannot run)"
    )
    doctor.add_argument("--models", help="model store folder; default RKLLAMA_MODELS or ~/RKLLAMA/models")
    doctor.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a copy of a board's file system
    doctor.set_defaults(func=cmd_doctor)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)

    run_ = sub.add_parser("run", help="chat with a model (one answer with PROMPT or piped input)")
    run_.add_argument("model")
    run_.add_argument("prompt", nargs="*", help="answer this prompt once and exit")
    run_.add_argument("--verbose", action="store_true", help="show timings for each response")
    run_.add_argument("--keepalive", help="how long the model stays loaded (e.g. 5m, 0, -1)")
    run_.set_defaults(func=cmd_run)
    pull = sub.add_parser("pull", help="download a model")
    pull.add_argument("model")
    pull.set_defaults(func=cmd_pull)
    list_ = sub.add_parser("list", aliases=["ls"], help="list models")
    list_.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="show information about a model")
    show.add_argument("model")
    for flag in ("modelfile", "parameters", "system", "template", "license"):
        show.add_argument(f"--{flag}", action="store_true", help=f"show the model's {flag}")
    show.set_defaults(func=cmd_show)
    ps = sub.add_parser("ps", help="list loaded models")
    ps.set_defaults(func=cmd_ps)
    stop = sub.add_parser("stop", help="unload a model")
    stop.add_argument("model")
    stop.set_defaults(func=cmd_stop)
    rm = sub.add_parser("rm", help="remove models")
    rm.add_argument("models", nargs="+", metavar="model")
    rm.set_defaults(func=cmd_rm)
    cp = sub.add_parser("cp", help="copy a model")
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.set_defaults(func=cmd_cp)
    create = sub.add_parser("create", help="create a model from a Modelfile")
    create.add_argument("name")
    create.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    create.set_defaults(func=cmd_create)
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
    except DaemonUnreachable as exc:
        print(
            f"Error: could not connect to rkllama-ollama at {exc.base_url} — is it running? "
            "(rkllama-ollama serve)",
            file=sys.stderr,
        )
        return 1
    except (DaemonError, CommandError) as exc:
        sys.stdout.flush()
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
