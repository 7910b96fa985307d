"""Turn a pytest-benchmark JSON file into a markdown table of side-by-side ratios.

Usage: python benchmarks/ratios.py RESULTS.json [--baseline composition]

Within each group every row is divided by the group's baseline row (and by the
``floor`` row where the group has one), so the ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def param_of(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(params.get("impl", bench["name"]))


def table(results: dict, baselines: list[str]) -> str:
    groups = defaultdict(dict)
    for bench in results["benchmarks"]:
        groups[bench["group"]][param_of(bench)] = bench["stats"]["median"]
    out = []
    for group, rows in groups.items():
        base = next((b for b in baselines if b in rows), None)
        out.append(f"\n**{group}**\n")
        out.append("| impl | median ms | speed-up vs " + (base or "-") + " | x floor |")
        out.append("|---|---:|---:|---:|")
        for impl, t in sorted(rows.items(), key=lambda kv: kv[1]):
            speedup = f"{rows[base] / t:.2f}x" if base else "-"
            floor = f"{t / rows['floor']:.2f}" if "floor" in rows else "-"
            out.append(f"| {impl} | {1e3 * t:.3f} | {speedup} | {floor} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--baseline", default="composition,reference",
                        help="comma-separated row names; the first present in a group is its baseline")
    args = parser.parse_args()
    with open(args.json) as fh:
        results = json.load(fh)
    machine = results.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; date: {results.get('datetime', '?')[:10]}")
    print(table(results, [b for b in re.split(r",\s*", args.baseline) if b]))


if __name__ == "__main__":
    main()
