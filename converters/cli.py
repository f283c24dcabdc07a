"""`onnxgate convert`: one native model file -> one validated, published version.

The gateway's CLI wires its `convert` sub-command to `configure_parser` and `run`; `python -m
onnxgate.converters.cli` runs the same thing on its own. Exit codes: 0 published, 1 refused by the parity
check (nothing written), 2 cannot convert (unsupported, corrupt, missing dependency).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from onnxgate import converters
from onnxgate.converters import parity, sample
from onnxgate.converters.base import Conversion

EXIT_PUBLISHED = 0
EXIT_REFUSED = 1
EXIT_ERROR = 2


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes such as 3,32,32") from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="model file, or module:attr for a PyTorch module")
    parser.add_argument(
        "--framework",
        choices=sorted([*converters.CONVERTERS, *converters.ALIASES]),
        help="what wrote the source (default: from its suffix or contents)",
    )
    parser.add_argument("--model-repository", required=True, type=Path, help="the gateway's model repository")
    parser.add_argument("--model", required=True, help="model name: the version goes to REPOSITORY/MODEL/N")
    parser.add_argument("--sample", type=Path, help="rows for the parity check: .csv, .parquet, .npy or .npz")
    parser.add_argument("--rows", type=int, default=sample.DEFAULT_ROWS, help="generated rows when no --sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated rows")
    parser.add_argument("--atol", type=float, default=parity.Tolerance.atol, help="absolute tolerance")
    parser.add_argument(
        "--rtol", type=float, default=parity.Tolerance.rtol, help="relative tolerance for regression values"
    )
    parser.add_argument("--input-shape", type=_shape, help="one row's shape for PyTorch sources, e.g. 3,32,32")
    parser.add_argument("--report", type=Path, help="also write the conversion report (JSON) here")
    parser.add_argument(
        "--recipe",
        help="keep a training record so the learning loop can retrain the model: sklearn, xgboost, lightgbm,"
        " catboost, r, or python:module:function (needs --training-data)",
    )
    parser.add_argument(
        "--training-data",
        type=Path,
        help="the base training data (.csv with a header, or .parquet), copied into the version as Parquet;"
        " also the parity sample when no --sample is given",
    )
    parser.add_argument(
        "--target", help="the target column of --training-data (default: the one column the model does not read)"
    )
    parser.add_argument(
        "--ladder",
        help="model families the learning loop climbs, simplest first, e.g. logistic,gbm or ridge,gbm (recipe sklearn;"
        " names: logistic, linear, ridge, tree, forest, gbm, or module.Class): a more complex family is tried only"
        " when the simpler one's learning curve has flattened, and kept only when significantly better",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="the learning loop also tries the served model updated on the newest rows (partial_fit, or a"
        " booster's more rounds), promoted by the same rule",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


class _Progress:
    """One stderr line per stage, with the time the previous stage took."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()
        self.last = self.started

    def __call__(self, stage: str) -> None:
        now = time.monotonic()
        if not self.quiet:
            print(f"[{now - self.started:6.1f}s] {stage}", file=sys.stderr, flush=True)
        self.last = now


def _recorder(args: argparse.Namespace) -> Callable[[Conversion], converters.Attached] | None:
    """The training record's builder for --recipe/--training-data (learning/training.py), or None."""
    recipe, data, target = (
        getattr(args, "recipe", None),
        getattr(args, "training_data", None),
        getattr(args, "target", None),
    )
    options: dict[str, object] = {}
    if getattr(args, "ladder", None):
        options["ladder"] = [f.strip() for f in args.ladder.split(",") if f.strip()]
    if getattr(args, "online", False):
        options["online"] = True
    if recipe is None and data is None and target is None and not options:
        return None
    if recipe is None or data is None:
        raise converters.ConversionError(
            "--recipe and --training-data go together (and --target, --ladder, --online with them)"
        )
    from onnxgate.learning.training import Recorder

    framework = (
        converters.resolve_framework(args.framework) if args.framework else converters.detect_framework(args.source)
    )
    return Recorder(
        args.source, framework, recipe, data, target, rows=args.rows, seed=args.seed, options=options
    ).attach


def run(args: argparse.Namespace) -> int:
    progress = _Progress(args.quiet)
    try:
        attach = _recorder(args)
        outcome = converters.convert_to_repository(
            args.source,
            args.model_repository,
            args.model,
            args.framework,
            sample_path=args.sample,
            rows=args.rows,
            tolerance=parity.Tolerance(atol=args.atol, rtol=args.rtol),
            input_shape=args.input_shape,
            seed=args.seed,
            progress=progress,
            attach=attach,
        )
    except converters.ConversionError as error:
        print(f"onnxgate convert: {error}", file=sys.stderr)
        return EXIT_ERROR
    if args.report:
        args.report.write_text(converters.report_json(outcome) + "\n")
    print(outcome.parity.summary(), file=sys.stderr)
    if outcome.published is None:
        print(
            f"onnxgate convert: refused - the ONNX model does not match the original; nothing was published"
            f"{'' if args.report else ' (--report FILE keeps the full report)'}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    progress(f"done: published {outcome.published}")
    print(outcome.published)
    return EXIT_PUBLISHED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnxgate convert", description=__doc__)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
