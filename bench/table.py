"""
The README's benchmark table, from the JSON that runs saved (``python -m bench --out``):

    python -m bench.table "before=/tmp/before.json" "after, run 1=bench/results.json" "after, run 2=/tmp/2.json"

One row per figure, one column per run: the figure the target is about (a ratio to direct, or a
time or size), with swapproxy's and direct's medians beside a ratio; then the target, and how
many of the runs met it.
"""

from __future__ import annotations

import json
import sys

from bench.run import table_rows


def _median(cell: str) -> str:
    return cell.split(" / ")[0].split(" (")[0].split(" -> peak")[0]


def cell(row: tuple[str, ...]) -> str:
    """
    One run's figure, as the README shows it.
    """
    _, proxied, direct, ratio, result, target, _ = row
    if target.startswith("ratio") or (not target and ratio and ratio != "-"):
        return f"{ratio} ({_median(proxied)} vs {_median(direct)})"
    return result or proxied or direct


def markdown(runs: list[tuple[str, dict]]) -> str:
    """
    A Markdown table of the figures of ``runs`` (label, the JSON a run saved).
    """
    per_run = [{row[0]: row for row in table_rows(run["figures"])} for _, run in runs]
    names: list[str] = []
    for rows in sorted(per_run, key=len, reverse=True):
        names += [name for name in rows if name not in names]
    header = ["figure", "target", *[label for label, _ in runs], "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        rows = [by_name.get(name) for by_name in per_run]
        target = next((row[5] for row in rows if row is not None and row[5]), "")
        verdicts = [row[6] for row in rows if row is not None and row[6] in ("met", "MISSED")]
        met = f"{verdicts.count('met')} of {len(verdicts)}" if verdicts else ""
        cells = [name.strip(), target, *[cell(row) if row is not None else "" for row in rows], met]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments:
        print(__doc__, file=sys.stderr)
        return 2
    runs = []
    for index, argument in enumerate(arguments):
        label, _, path = argument.rpartition("=") if "=" in argument else (f"run {index + 1}", "", argument)
        with open(path, encoding="utf-8") as f:
            runs.append((label, json.load(f)))
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
