"""The `mmserve` command: subcommands registered in SUBCOMMANDS (add one with `register`).

Heavy imports (torch, onnx, bentoml) happen inside each subcommand's `run`, so `mmserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmserve.cli_args import add_backbone_arguments, load_backbone_from_args, positive_int, project_models_dir
from mmserve.errors import MmserveError


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its help line, a function adding its arguments, and the function running it (exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    """Add subcommand `name` to `mmserve`."""
    SUBCOMMANDS[name] = Subcommand(name, help, configure, run)


def _prompt_shape(text: str) -> tuple[int, int]:
    try:
        depth, tokens = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,P (prompted layers, prompt tokens), got {text!r}") from None
    if depth < 1 or tokens < 1:
        raise argparse.ArgumentTypeError(f"K and P must be >= 1, got {text!r}")
    return depth, tokens


# ---- export-onnx --------------------------------------------------------------------------------------------


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="output directory (default: models/onnx)")
    add_backbone_arguments(p)
    p.add_argument("--registry", type=Path, default=None,
                   help="export an image graph for every prompt shape in this registry and a graph per fusion task")
    p.add_argument("--prompt-shape", type=_prompt_shape, action="append", default=[], metavar="K,P",
                   help="also export an image graph for prompts of K layers x P tokens (repeatable); without "
                        "--registry and --prompt-shape: every layer x 8 tokens (MmAP group + task, 4 each)")
    p.add_argument("--optimize", action="store_true",
                   help="also write the fused variant (attention, skip-LayerNorm, bias-GELU as onnxruntime ops)")
    p.add_argument("--int8", action="store_true",
                   help="also write dynamic int8 (from the fused graph; implies --optimize)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.export-based exporter (default) or the TorchScript one")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-unprompted", action="store_true", help="skip the unprompted graph (image-k0-p0)")


def _run_export(args: argparse.Namespace) -> int:
    from mmserve.builders import load_registry
    from mmserve.onnx.export import ExportOptions, export_all

    backbone, note = load_backbone_from_args(args)
    print(f"backbone {backbone.spec.model} ({backbone.fingerprint}); {note}")
    registry = load_registry(args.registry, backbone) if args.registry else None
    shapes = list(args.prompt_shape)
    if registry is None and not shapes:
        shapes = [(backbone.vision_layers, 8)]
    out = args.out or project_models_dir() / "onnx"
    options = ExportOptions(optimize=args.optimize or args.int8, int8=args.int8, exporter=args.exporter,
                            opset=args.opset)
    written = export_all(backbone, out, registry, shapes, options, unprompted=not args.no_unprompted)
    for g in written:
        what = f"prompts K={g.depth} P={g.prompt_tokens}" if g.kind == "image" else f"fusion task {g.task}"
        diff = "-" if g.parity_max_abs_diff is None else f"{g.parity_max_abs_diff:.1e}"
        fused = ", ".join(f"{k} {v}" for k, v in g.fused_ops.items())
        print(f"{out / g.file}  [{what}; max|diff| vs torch {diff}; {fused}]")
    return 0


register("export-onnx", "export the prompted image tower (and fusion tasks) to ONNX", _configure_export,
         _run_export)


# ---- registry ---------------------------------------------------------------------------------------------


def _configure_registry(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in (("list", "the current version and every task with its group and blob hashes"),
                           ("history", "every move of the current version, newest last")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("store", help="store (local path or s3://bucket/prefix) or registry directory")
        q.add_argument("--json", action="store_true", help="print JSON")
    q = sub.add_parser("add", help="copy tasks (with their groups) into the store: a new version; same name = replace")
    q.add_argument("store")
    q.add_argument("source", help="a training run's registry directory, or another store")
    q.add_argument("--task", action="append", default=[], help="a task to copy (repeatable; default all)")
    q = sub.add_parser("remove", help="remove tasks: a new version")
    q.add_argument("store")
    q.add_argument("names", nargs="+", metavar="NAME")
    q = sub.add_parser("rollback", help="make an earlier version current (default: the one before)")
    q.add_argument("store")
    q.add_argument("version", nargs="?", default=None)
    for q in (sub.choices["add"], sub.choices["remove"], sub.choices["rollback"]):
        q.add_argument("--expect", default=None, metavar="VERSION",
                       help="fail (instead of recomputing the change) unless the store is at this version")
    q = sub.add_parser("verify", help="check every version file and every blob's sha256")
    q.add_argument("store")
    q = sub.add_parser("gc", help="drop versions and blobs the last N history entries do not use")
    q.add_argument("store")
    q.add_argument("--keep", type=positive_int, default=10, help="history entries whose versions stay (default 10)")


def _run_registry(args: argparse.Namespace) -> int:
    from mmserve import versions
    from mmserve.store import Store

    store = Store.open(args.store)
    if args.action in ("add", "remove", "rollback"):
        if args.action == "add":
            done = versions.add_tasks(store, args.source, args.task or None, args.expect)
        elif args.action == "remove":
            done = versions.remove_tasks(store, args.names, args.expect)
        else:
            done = versions.rollback(store, args.version, args.expect)
        print(f"{store.url}: {done.previous_version} -> {done.version} (#{done.sequence}: {done.operation})")
        return 0
    if args.action in ("list", "history"):
        data = versions.listing(store) if args.action == "list" else versions.history(store)
        print(json.dumps(data, indent=2) if args.json else _registry_text(args.action, data))
        return 0
    if args.action == "verify":
        problems = versions.verify(store)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{store.url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    report = versions.gc(store, args.keep)
    print(f"{store.url}: kept {len(report['kept_versions'])} version(s), removed {len(report['removed_versions'])} "
          f"version(s) and {report['removed_blobs']} blob(s)")
    return 0


def _registry_text(action: str, data) -> str:
    """`registry list` / `registry history` as lines for a terminal."""
    if action == "history":
        return "\n".join(f"#{h['sequence']:<5} {h['version']}  {h['created']}  {h['operation']}"
                         f"{'  (current)' * h['current']}" for h in data)
    lines = [f"{data['store']}: version {data['version']} (#{data['sequence']}), {len(data['tasks'])} tasks"]
    lines += [f"  {t['name']:24} {t['kind']:8} group {t['group'] or '-':12} blob {t['blobs']['task'][:12]}"
              for t in data["tasks"]]
    return "\n".join(lines)


register("registry", "a registry store: list, history, add, remove, rollback, verify, gc", _configure_registry,
         _run_registry)


# ---- bench --------------------------------------------------------------------------------------------------


def _configure_bench(p: argparse.ArgumentParser) -> None:
    from mmserve.bench import add_bench_arguments

    add_backbone_arguments(p)
    add_bench_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from mmserve.bench import run_from_args

    return run_from_args(args)


register("bench", "benchmark: backbone floor, prompted engine (torch / onnx), mixed tasks, HTTP", _configure_bench,
         _run_bench)


# ---- entry point --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="mmserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in SUBCOMMANDS.values():
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mmserve COMMAND ...`; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return SUBCOMMANDS[args.command].run(args)
    except MmserveError as exc:
        print(f"mmserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
