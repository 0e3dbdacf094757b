"""Summarise a ``py-spy record --gil --threads -f raw`` profile: who holds the GIL.

With ``--gil`` py-spy samples only the thread that holds the GIL, so the samples of each
thread are its share of GIL time. Prints, per thread, its samples and the functions
(innermost ``livemask`` frame, innermost frame) it held the GIL in most::

    py-spy record --gil --threads -r 100 -f raw -o gil.txt -- python -m livemask bench ...
    python benchmarks/gil_profile.py gil.txt --json gil.json

``benchmarks/gpu.sh`` does this for the 2048² GPU bench when ``py-spy`` is on the PATH.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

_THREAD = re.compile(r"^thread \(\d+\)(?:: (?P<name>.*))?$")


def summarise(raw: str, top: int = 8) -> dict[str, Any]:
    """``{"samples": n, "threads": {name: {"samples", "share", "top": [[where, n], ...]}}}``."""
    per_thread: Counter[str] = Counter()
    where: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = _THREAD.match(frames[0])
        name = (match.group("name") if match else None) or frames[0]
        name = re.sub(r"_\d+$", "", name)  # executor threads: livemask-infer_0 -> livemask-infer
        n = int(count)
        per_thread[name] += n
        ours = [f for f in frames[1:] if "livemask" in f]
        inner = frames[-1].split(" (")[0] if len(frames) > 1 else "-"
        label = (ours[-1].split(" (")[0] + " > " if ours else "") + inner
        where[name][label] += n
    total = sum(per_thread.values())
    return {
        "samples": total,
        "threads": {
            name: {
                "samples": n,
                "share": round(n / total, 3) if total else 0.0,
                "top": [[label, k] for label, k in where[name].most_common(top)],
            }
            for name, n in per_thread.most_common()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw", type=Path, help="py-spy raw (collapsed stacks) output")
    parser.add_argument("--top", type=int, default=8, help="functions listed per thread")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    summary = summarise(args.raw.read_text(encoding="utf-8"), args.top)
    print(f"{summary['samples']} samples with the GIL held")
    for name, info in summary["threads"].items():
        print(f"{info['share']:6.1%}  {name}")
        for label, n in info["top"]:
            print(f"{n:8d}  {label}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
