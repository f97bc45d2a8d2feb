"""`python -m bench [NAME ...] [--repeats N]`: run benchmarks and collate bench/results/*.json into a table."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

from bench.common import RESULTS_DIR

SKIP = {"common", "__main__", "peers"}  # helpers, not benchmarks


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in SKIP)


def table() -> str:
    rows = ["| benchmark | ours | peer | unit | ratio | goal | repeats |", "|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS_DIR.glob("*.json")):
        r = json.loads(path.read_text())
        rows.append(
            f"| {r['name']} | {r['ours']:.4g} | {r['peer']:.4g} | {r['unit']} | {r['ratio']:.3g} | "
            f"{r['goal']} | {r['repeats']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table-only", action="store_true", help="only collate existing results")
    args = parser.parse_args(argv)
    if not args.table_only:
        names = args.names or available()
        unknown = [n for n in names if n not in available()]
        if unknown:
            print(f"bench: unknown benchmark {unknown[0]!r}; choose from {available()}", file=sys.stderr)
            return 2
        for name in names:
            print(f"== {name}", flush=True)
            res = importlib.import_module(f"bench.{name}").run(repeats=args.repeats)
            print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2, default=float))
    text = table()
    (RESULTS_DIR / "SUMMARY.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
