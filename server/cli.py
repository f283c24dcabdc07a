"""The `onnxgate` command: serve, convert, dataset."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxgate import __version__
from onnxgate.server.config import FIELDS, Settings, SettingsError, env_name, load_settings
from onnxgate.server.preflight import problems as preflight
from onnxgate.server.preflight import unusable_repository

log = logging.getLogger("onnxgate")

DEFAULT_EXAMPLE_DIR = Path.home() / ".cache" / "onnxgate" / "example-repository"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onnxgate", description="Polyglot model-serving gateway (Open Inference Protocol v2 over gRPC)"
    )
    parser.add_argument("--version", action="version", version=f"onnxgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model repository over gRPC", argument_default=argparse.SUPPRESS)
    serve.add_argument("--config", type=Path, help="TOML settings file (keys as the flags, with underscores)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        # argparse %-formats help texts: a literal % in a setting's help must reach it doubled
        help_text = f"{f.metadata.get('help', '')} [env {env_name(name)}; default {f.default!r}]".replace("%", "%%")
        if f.type in ("bool",):
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif name == "load_model":
            serve.add_argument(flag, action="append", help=help_text)
        else:
            serve.add_argument(flag, help=help_text)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        _add_subcommand(sub, name, module, help_text, configure=name == chosen)
    args = parser.parse_args(_renamed(argv, chosen))
    if args.command == "serve":
        return _serve(vars(args))
    if hasattr(args, MODEL_ARGUMENT):
        _take_positional_model(sub.choices[args.command], args)
    return int(args.run(args))


# One name for one thing in every subcommand: --predlog-dir for the prediction log, --model-repository for
# the repository, --model for a model's name. The names they replace still work for one release, with a line
# on stderr saying what to write instead.
DEPRECATED_FLAGS = {
    "dataset": {"--log-dir": "--predlog-dir"},
    "convert": {"--name": "--model"},
}
# the subcommands that took the model's name as their first positional argument (retrain, evaluate,
# models show) keep it under this dest, hidden from --help; `--model` is the name to use
MODEL_ARGUMENT = "positional_model"


def _renamed(argv: list[str], command: str | None) -> list[str]:
    """argv with the deprecated flags of `command` replaced by their new names (also as --flag=value)."""
    renames = DEPRECATED_FLAGS.get(command or "", {})
    out = []
    for arg in argv:
        old, eq, value = arg.partition("=")
        if old in renames:
            _deprecated(command or "", old, renames[old])
            arg = renames[old] + eq + value
        out.append(arg)
    return out


def _take_positional_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positional = getattr(args, MODEL_ARGUMENT)
    if positional is not None:
        command = args.command + (" show" if args.command == "models" else "")
        _deprecated(command, "the model name as a positional argument", "--model NAME")
        if args.model is not None and args.model != positional:
            parser.error(f"two model names: {positional!r} and --model {args.model!r}; give --model only")
        args.model = positional
    if args.model is None:
        parser.error("the following arguments are required: --model")


def _deprecated(command: str, old: str, new: str) -> None:
    print(f"onnxgate {command}: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr)


# the other commands, each in its own module: only the one that runs is imported (`serve` never loads
# the converters' or the learning loop's libraries)
SUBCOMMANDS = {
    "convert": ("onnxgate.converters.cli", "convert a model to ONNX, check parity, publish a version"),
    "dataset": ("onnxgate.server.dataset", "export joined predictions and feedback"),
    "retrain": ("onnxgate.learning.retrain", "retrain a model from its feedback; promote only if significantly better"),
    "learn": ("onnxgate.learning.learn", "keep retraining models when labels, quality or drift say so"),
    "models": ("onnxgate.learning.models", "show a model's versions, lineage, decisions and drift"),
    "demo": ("onnxgate.learning.demo", "run the learning loop on this machine: `onnxgate demo drift`"),
    "evaluate": (
        "onnxgate.learning.offpolicy",
        "estimate from the logs what a version would have scored on live traffic",
    ),
}


def _add_subcommand(sub: Any, name: str, module: str, help_text: str, *, configure: bool) -> None:
    parser = sub.add_parser(name, help=help_text)
    if not configure:
        return
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # an optional part of onnxgate whose libraries are not installed
        parser.error(
            f"{e}; install the extra this command needs (docs/getting-started.md: `pip install 'onnxgate[...]'`)"
        )
    mod.configure_parser(parser)
    parser.set_defaults(run=mod.run)


def _serve(args: dict[str, Any]) -> int:
    args.pop("command")
    config_file = args.pop("config", None)
    try:
        settings = load_settings(config_file, flags=args)
    except SettingsError as e:
        return _refuse(e.problems)
    root = settings.model_repository
    if settings.example:
        root = root or DEFAULT_EXAMPLE_DIR
        # the example's directory is built at start: only a non-directory there is refused (never replaced)
        if root.exists() and not root.is_dir():
            return _refuse([unusable_repository(root) or ""])
        # the embedded default logs every prediction on local disk, beside the example repository
        predlog_dir = settings.predlog_dir or str(root.parent / "predlog")
        settings = dataclasses.replace(settings, model_repository=root, predlog_dir=predlog_dir)
    assert root is not None
    # everything checked before anything starts or is logged: every problem at once, one line each
    found = preflight(settings, None if settings.example else root)
    try:
        loop_factory = _loop_factory(settings.event_loop)
    except SettingsError as e:
        found += e.problems
    if found:
        return _refuse(found)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if settings.example:
        from onnxgate.server.example import ensure_example_repository

        root = ensure_example_repository(root)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_run(settings, root))


def _refuse(problems: list[str]) -> int:
    """`onnxgate serve` cannot start: each problem on its own line, exit status 2."""
    for problem in problems:
        print(f"onnxgate: {problem}", file=sys.stderr)
    return 2


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when chosen, or with `auto` where it is installed; None: asyncio's own. grpc.aio's I/O
    runs on this loop: uvloop's is cheaper per request (docs/explanation/profile.md)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                "setting event_loop = 'uvloop' but uvloop is not installed: pip install uvloop, or set"
                " --event-loop asyncio"
            ) from None
        return None
    return uvloop.new_event_loop


async def _run(settings: Settings, root: Path) -> int:
    from onnxgate.server.app import Gateway, StartupError
    from onnxgate.server.drain import SETTLE_S

    try:
        gateway = Gateway(settings, root)  # takes the prediction log's replica directory
    except StartupError as e:
        print(f"onnxgate: {e}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except StartupError as e:
        await gateway.stop(0)  # whatever started before the failure (a bound port, the log writer)
        print(f"onnxgate: {e}", file=sys.stderr)
        return 2
    # What start-up made (modules, the models' sessions, the example's training data) lives as long as
    # the process: frozen out of the collector, a full collection no longer walks it. With the prediction
    # log on, records in flight reach the oldest generation and trigger full collections: measured ~48 ms
    # each (the loop paused) before, ~1.5 ms after (docs/explanation/profile.md).
    gc.freeze()
    # one machine-readable line: tests and scripts started with --grpc-port 0 read the ports from it
    print(
        f"onnxgate: serving gRPC on {gateway.address} metrics on {gateway.metrics_port or 'off'}"
        f" http on {gateway.http_port or 'off'}",
        file=sys.stderr,
        flush=True,
    )
    if settings.example:
        print(how_to_call(settings.host, gateway.port, gateway.http_port), file=sys.stderr, flush=True)
    await stop.wait()
    log.info(
        "shutting down: new requests refused, requests in flight get up to %ss (drain delay %ss)",
        settings.shutdown_grace_s,
        settings.drain_delay_s,
    )
    await gateway.stop(stop_grpc=False)
    # the gRPC server still answers new calls UNAVAILABLE: exiting closes its connections, and a call caught
    # in that moment ends UNAVAILABLE too; grpc's own stop would cancel (CANCELLED) calls it had not yet
    # handed to a handler (server/drain.py). A moment first for answers just handed to gRPC to go out.
    await asyncio.sleep(SETTLE_S)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def how_to_call(host: str, port: int, http_port: int = 0) -> str:
    """What a person who just started the example server types next."""
    # a server on every interface is called on this machine's loopback name
    name = "localhost" if host in ("0.0.0.0", "::", "[::]", "") else host
    address = f"{name}:{port}"
    curl = (
        f"""onnxgate: the example is ready; call it with curl:

    curl -s -H 'Content-Type: application/json' http://{name}:{http_port}/v2/models/iris/infer \\
      -d '{{"inputs": [{{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}}]}}'

  or """
        if http_port
        else "onnxgate: the example is ready; call it "
    )
    return f"""{curl}from Python:

    import numpy as np
    from onnxgate.client import Client

    with Client("{address}") as client:
        result = client.infer("iris", {{"input": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)}})
        print(result["label"], result["probabilities"])
        client.send_feedback(result.id, label="0")  # the true class, for the quality metrics

  or with tritonclient[grpc] (tritonclient.grpc.InferenceServerClient("{address}")), or grpcurl -plaintext {address} list
"""


if __name__ == "__main__":
    sys.exit(main())
