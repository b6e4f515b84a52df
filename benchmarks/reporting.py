"""What the benchmarks share: measuring a checkpoint directory and printing a result table."""

import json
import os


def dir_stats(path: str):
    """(number of files, bytes) below `path`."""
    files = size = 0
    for root, _, names in os.walk(path):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return files, size


def report(title: str, summary: dict, rows: list, as_json: bool) -> None:
    """Prints `rows` (dicts with the same keys) as JSON or as a Markdown table under `title`."""
    if as_json:
        print(json.dumps({**summary, "results": rows}, indent=1))
        return
    print(title)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
