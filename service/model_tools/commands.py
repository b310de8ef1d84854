"""The `befund model ...` subcommands: argument parsing and the report each one prints.

    befund model check DIR [--fix-sha256] [--out FOLDER]
    befund model bench DIR [--provider cpu|cuda] [--batches 1,8,32,64] [--concurrency 1,2,4]
    befund model evaluate DIR --data DIR [--labels CSV] [--compare OTHER_DIR]

Further `befund model` commands (e.g. `shadow-report`) register themselves on the same
subparsers through `add_model_parser(..., extra=[add_x_parser, ...])`.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from pathlib import Path

from service.model_tools.provenance import report_folder, write_json


def _ints(limit: int):  # noqa: ANN202 - an argparse type
    """A comma-separated list of whole numbers from 1 to `limit`."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from exc
        if not values or len(values) > 16 or any(v < 1 or v > limit for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: give 1 to 16 whole numbers from 1 to {limit}")
        return values

    return parse


def _number(kind: type, lo: float, hi: float):  # noqa: ANN202 - an argparse type
    """A number from `lo` to `hi`: every size and time that starts work is bounded."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from exc
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text}: give a value from {lo:g} to {hi:g}")
        return value

    return parse


def cmd_check(args: argparse.Namespace) -> int:
    from service.model_tools.card_check import check_model, fix_sha256
    from service.model_tools.check_report import plot_check
    from service.model_tools.provenance import provenance

    folder = Path(args.folder)
    if args.fix_sha256:
        digest = fix_sha256(folder)
        print(f"befund: {folder / 'card.yaml'}: sha256 set to {digest}")
    report = check_model(folder)
    for check in report.checks:
        print(check.line())
    out = report_folder(args.out, "check", report.card.name if report.card else folder.name)
    write_json(out / "check.json", {
        "command": "check", "ok": report.ok,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
        "smoke_inference": report.smoke,
        "provenance": provenance(report.card, list(report.smoke))})
    plot_check(report, out / "check.png")
    failed = sum(not c.ok for c in report.checks)
    print(f"{'passed' if report.ok else f'FAILED ({failed} of {len(report.checks)} checks)'}; "
          f"report in {out}")
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from service.model_tools.bench import run_bench

    return run_bench(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from service.model_tools.evaluate import run_evaluate

    return run_evaluate(args)


def _wrap(text: str) -> str:
    """Descriptions print as written (the CLI's formatter keeps layout): fill them here."""
    return textwrap.fill(" ".join(text.split()), 90)


def add_model_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter],
                     extra: list[Callable[[argparse._SubParsersAction], None]] = ()) -> None:
    """`befund model ...` on the CLI's subparsers; `extra` adds more model commands."""
    m = sub.add_parser("model", help="check, benchmark and evaluate a model folder (card.yaml + ONNX)",
                       formatter_class=formatter,
                       description=_wrap(
                           "Tools for a model folder (card.yaml + ONNX file). Each writes JSON and PNG into "
                           "a report folder (--out) with the provenance of every figure: CPU, cores, GPU, "
                           "onnxruntime version and provider, the model's sha256, befund's version."))
    cmds = m.add_subparsers(dest="model_command", required=True)
    out_help = "report folder (default: model-reports/<command>-<model>-<UTC time>/)"

    c = cmds.add_parser("check", formatter_class=formatter,
                        help="card and ONNX agree, keys known, sha256, smoke inference per provider",
                        description=_wrap("Checks that card.yaml and the ONNX file agree (input and output "
                        "names, shapes, dtypes, opset), that every key of the card is known, that the "
                        "sha256 is right, and runs synthetic batches under every onnxruntime provider "
                        "present. One line per check; exit 1 when any fails."))
    c.add_argument("folder", help="the model folder (card.yaml and its ONNX file)")
    c.add_argument("--fix-sha256", action="store_true",
                   help="first rewrite the card's sha256 to the ONNX file's")
    c.add_argument("--out", help=out_help)
    c.set_defaults(func=cmd_check)

    b = cmds.add_parser("bench", formatter_class=formatter,
                        help="throughput and latency: raw onnxruntime vs the model service, and "
                             "end-to-end time to result through a node",
                        description=_wrap("Model-only throughput and p50/p95/p99 latency per batch size and "
                        "number of concurrent callers, raw onnxruntime and befund's model service side "
                        "by side (ratio), the FLOP rate against this machine's measured sgemm rate, and "
                        "the time from series complete to result at a PACS through a running node, for a "
                        "generated study of the model's task."))
    b.add_argument("folder", help="the model folder")
    b.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime provider")
    b.add_argument("--batches", type=_ints(4096), default=[1, 8, 32, 64],
                   help="batch sizes (default: 1,8,32,64)")
    b.add_argument("--concurrency", type=_ints(64), default=[1, 2, 4],
                   help="callers in flight at once (default: 1,2,4)")
    b.add_argument("--seconds", type=_number(float, 0.05, 600), default=3.0,
                   help="measuring time per batch size, concurrency and side")
    b.add_argument("--threads", type=_number(int, 0, 1024), default=0,
                   help="onnxruntime intra-op threads, the same for both sides (0: all usable cores)")
    b.add_argument("--e2e-slices", type=_number(int, 16, 2000), default=64,
                   help="slices of the generated CT study (ct-slices models)")
    b.add_argument("--e2e-runs", type=_number(int, 1, 100), default=2, help="studies sent through the node")
    b.add_argument("--skip-service", action="store_true", help="leave out the model service side")
    b.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end run through a node")
    b.add_argument("--out", help=out_help)
    b.set_defaults(func=cmd_bench)

    e = cmds.add_parser("evaluate", formatter_class=formatter,
                        help="send labelled studies through a node and measure sensitivity, "
                             "specificity, AUC, calibration, subgroups; --compare another model",
                        description=_wrap("Starts a node with the model (and a DCMTK storescp as its PACS), "
                        "C-STOREs every labelled study under --data, reads each result SR back and "
                        "reports sensitivity, specificity, PPV, NPV (Wilson 95 % intervals), ROC AUC "
                        "(bootstrap interval), the confusion matrix, calibration (reliability diagram, "
                        "ECE) and per-subgroup figures. Labels come from --labels, else from the "
                        "ground truth of phantom folders written by `befund phantom`."))
    e.add_argument("folder", help="the model folder")
    e.add_argument("--data", required=True,
                   help="folder of studies (DICOM files, any depth; required, no default)")
    e.add_argument("--labels", help="CSV with columns study_uid, label (1/0, present/absent) and any "
                   "subgroup columns (default: phantom ground truth)")
    e.add_argument("--compare", metavar="OTHER_DIR",
                   help="a second model folder run on the same studies: agreement, kappa, flips "
                        "(default: none)")
    e.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="the node's inference provider")
    e.add_argument("--timeout", type=_number(float, 1, 86400), default=600.0,
                   help="seconds to wait for all results")
    e.add_argument("--bootstrap", type=_number(int, 0, 100000), default=2000,
                   help="bootstrap resamples for the AUC interval")
    e.add_argument("--out", help=out_help)
    e.set_defaults(func=cmd_evaluate)

    for add in extra:
        add(cmds)
