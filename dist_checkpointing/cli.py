"""`dist-ckpt` (also `python -m dist_checkpointing`): inspect, verify and convert checkpoints.

    dist-ckpt inspect DIR [--json]     (DIR: a checkpoint, or a node's memory-tier directory)
    dist-ckpt verify DIR [--json]
    dist-ckpt convert SRC DST --to zarr|tensorstore|torch_dist|torch|safetensors
                      [--zarr-format 2|3] [--max-file-size 5GB]

Exit codes: 0 success (for verify: the checkpoint is sound), 1 a damaged or incomplete
checkpoint (inspect: one it could not fully describe) or a failed conversion, 2 bad arguments.
"""

import argparse
import contextlib
import json
import re
import sys
from typing import List, Optional

from .convert import DEFAULT_MAX_FILE_BYTES, FORMATS, convert
from .core import CheckpointingException
from .inspection import describe, describe_memory, verify, verify_memory
from .memory_format import is_node_directory


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CheckpointingException as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-ckpt", description="Inspect, verify and convert distributed checkpoints.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="format, engine, completeness, tensors, objects, common keys")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_inspect)
    check = commands.add_parser("verify", help="completeness and every checksum (exit 0 only when sound)")
    check.add_argument("dir")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=_verify)
    conv = commands.add_parser("convert", help="to another engine, one torch.save file, or safetensors")
    conv.add_argument("src")
    conv.add_argument("dst", help="a checkpoint directory, a .pt file (torch) or a directory (safetensors)")
    conv.add_argument("--to", required=True, choices=FORMATS)
    conv.add_argument("--zarr-format", type=int, choices=(2, 3), default=3)
    conv.add_argument("--max-file-size", type=_size, default=DEFAULT_MAX_FILE_BYTES,
                      help="safetensors: split into files of at most this size (e.g. 5GB, 500MB)")
    conv.set_defaults(run=_convert)
    return parser


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1GiB)")
    unit = (match.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    return int(float(match.group(1)) * base ** "_KMGT".index(unit[:1] or "_"))


def _inspect(args) -> int:
    if is_node_directory(args.dir):
        return _inspect_memory(args)
    info = describe(args.dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0 if info["complete"] and not info["problem"] else 1
    print(f"{info['path']}: {'complete' if info['complete'] else 'INCOMPLETE'}")
    if not info["complete"]:
        print(f"  {info['problem']}")
        print(f"  {info['files']} files, {_human(info['bytes_on_disk'])} on disk")
        return 1
    zarr = f", Zarr v{info['zarr_format']}" if "zarr_format" in info else ""
    print(f"  format: {info['format']}; engine: {info['engine']}{zarr}; common: {info['common_backend']}")
    print(f"  {len(info['tensors'])} tensors, {_human(info['tensor_bytes'])}; {info['files']} files, "
          f"{_human(info['bytes_on_disk'])} on disk")
    rows = [(t["key"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], _human(t["bytes"]),
             "x".join(map(str, t["grid"])) if t["grid"] else "-") for t in info["tensors"]]
    if rows:
        print()
        _table(("key", "shape", "dtype", "bytes", "shards"), rows)
    if info["objects"]:
        print(f"\n  objects ({len(info['objects'])}): {', '.join(info['objects'])}")
    if info.get("common_keys") is not None:
        print(f"\n  common state keys: {', '.join(info['common_keys']) or '(none)'}")
    if info["problem"]:
        print(f"\n  problem: {info['problem']}")
        return 1
    return 0


def _inspect_memory(args) -> int:
    info = describe_memory(args.dir)
    damaged = any(step["problems"] for step in info["steps"])
    if args.json:
        print(json.dumps(info, indent=1))
        return 1 if damaged else 0
    print(f"{info['path']}: a node's memory-tier directory, {len(info['steps'])} step(s)")
    rows = [(step["step"], step["save_id"][:8], f"{len(step['ranks'])} of {step['world_size']}",
             ",".join(map(str, step["ranks"])), _human(step["bytes"]), step["tensors"],
             "yes" if step["all_ranks_here"] else "needs other nodes", "DAMAGED" if step["problems"] else "ok")
            for step in info["steps"]]
    if rows:
        print()
        _table(("step", "save", "ranks here", "which", "bytes", "tensor pieces", "restorable from here alone", "checksums"), rows)
    for step in info["steps"]:
        for problem in step["problems"]:
            print(f"  step {step['step']}: {problem}")
    return 1 if damaged else 0


@contextlib.contextmanager
def _progress(description: str):
    """A `progress(name)` callback drawing a bar on stderr when it is a terminal; None (quiet)
    when it is piped or redirected."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=description, unit="entry", file=sys.stderr, leave=False) as bar:
        yield lambda name: bar.update(1)


def _verify(args) -> int:
    memory = is_node_directory(args.dir)
    with _progress(f"verifying {args.dir}") as progress:
        problems, checked = (verify_memory if memory else verify)(args.dir, progress)
    if args.json:
        print(json.dumps({"sound": not problems, "checked": checked,
                          "problems": [{"entry": e, "problem": p} for e, p in problems]}, indent=1))
    elif problems:
        print(f"{args.dir}: DAMAGED ({len(problems)} problem(s))")
        for entry, problem in problems:
            print(f"  {entry}: {problem}")
    elif memory:
        print(f"{args.dir}: sound ({checked['piece_files']} piece files, {checked['pieces']} pieces' CRC-32C verified)")
    else:
        integrity = f", {checked['integrity_files']} files' SHA-256 (integrity.json)" if checked["integrity_files"] else ""
        print(f"{args.dir}: sound ({checked['tensors']} tensors' chunks, {checked['objects']} objects, "
              f"{checked['files']} checksummed files{integrity} verified)")
    return 1 if problems else 0


def _convert(args) -> int:
    with _progress(f"converting to {args.to}") as progress:
        summary = convert(args.src, args.dst, args.to, args.zarr_format, args.max_file_size, progress)
    print(f"{args.src} -> {args.dst} ({args.to}): {summary['tensors']} tensors, {_human(summary['tensor_bytes'])}")
    if summary.get("skipped_objects") or summary.get("skipped_common_state"):
        print(f"  not in {args.to}: the common state and {summary['skipped_objects']} ShardedObjects "
              f"(exports hold tensors only)")
    return 0


def _human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _table(header, rows) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
