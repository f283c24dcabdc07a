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
        help_text = f"{f.metadata.get('help', '')} [env {env_name(name)}; default {f.default!r}]"
        if f.type in ("bool",):
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif name == "load_model":
            serve.add_argument(flag, action="append", help=help_text)
        else:
            serve.add_argument(flag, help=help_text)
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        _add_subcommand(sub, name, module, help_text, configure=name == chosen)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(vars(args))
    return int(args.run(args))


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
        parser.error(f"{e}; install the extra this command needs (see README: `pip install 'onnxgate[...]'`)")
    mod.configure_parser(parser)
    parser.set_defaults(run=mod.run)


def _serve(args: dict[str, Any]) -> int:
    args.pop("command")
    config_file = args.pop("config", None)
    try:
        settings = load_settings(config_file, flags=args)
    except SettingsError as e:
        print(f"onnxgate: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    root = settings.model_repository
    if settings.example:
        from onnxgate.server.example import ensure_example_repository

        root = root or DEFAULT_EXAMPLE_DIR
        # checked before building: the build replaces what is at `root` when it is not the example
        if root.exists() and not root.is_dir():
            print(f"onnxgate: {_unusable_repository(root)}", file=sys.stderr)
            return 2
        root = ensure_example_repository(root)
        # the embedded default logs every prediction on local disk, beside the example repository
        predlog_dir = settings.predlog_dir or str(root.parent / "predlog")
        settings = dataclasses.replace(settings, model_repository=root, predlog_dir=predlog_dir)
    assert root is not None
    problem = _unusable_repository(root)
    if problem:
        print(f"onnxgate: {problem}", file=sys.stderr)
        return 2
    try:
        loop_factory = _loop_factory(settings.event_loop)
    except SettingsError as e:
        print(f"onnxgate: {e}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_run(settings, root))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when chosen, or with `auto` where it is installed; None: asyncio's own. grpc.aio's I/O
    runs on this loop: uvloop's is cheaper per request (docs/profile.md)."""
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


def _unusable_repository(root: Path) -> str | None:
    """Why `root` cannot serve as the model repository, in one line that says what to change; None if it can."""
    where = "set --model-repository or ONNXGATE_MODEL_REPOSITORY"
    if not root.exists():
        return f"model repository {root} does not exist: {where}"
    if not root.is_dir():
        return f"model repository {root} is not a directory: {where} to the directory holding the models"
    try:
        with os.scandir(root):
            pass
    except OSError as e:
        return f"model repository {root} cannot be read ({e.strerror}): fix its permissions or {where}"
    return None


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
    # each (the loop paused) before, ~1.5 ms after (docs/profile.md).
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
