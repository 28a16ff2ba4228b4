#!/usr/bin/env python3
"""Summarises cargo's --timings report: where a build's time went, by crate.

    deploy/local/cargo-timings.py REPORT.html [--top N]

Reads the unit table cargo embeds in its HTML report (`const UNIT_DATA = [...]`) and prints the
build's wall time, the compile time summed over units (on 2 cores about twice the wall time),
the share of this workspace's own crates against its dependencies, the share of test targets,
and the N crates that took longest (all their units: build script, library, tests).
"""

import argparse
import json
import re
import sys
from collections import defaultdict

# The workspace's own packages; everything else is a dependency.
WORKSPACE = {
    "sandbox-controller",
    "sandbox-decisions",
    "sandbox-domain",
    "sandbox-executor",
    "sandbox-policy",
    "sandbox-devtools",
    "guest-heap",
}


def units_of(html: str) -> list:
    match = re.search(r"const UNIT_DATA = (\[.*?\]);\s*\n\s*const ", html, re.S)
    if not match:
        raise ValueError("no UNIT_DATA table in the report (not a cargo --timings report?)")
    return json.loads(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    with open(args.report, encoding="utf-8") as f:
        html = f.read()
    # Units cargo found fresh are listed with no time; only the compiled ones count.
    units = [u for u in units_of(html) if u["duration"] > 0]
    if not units:
        print(f"{args.report}: no units were compiled")
        return 0

    wall = max(u["start"] + u["duration"] for u in units)
    total = sum(u["duration"] for u in units)
    by_crate = defaultdict(float)
    ours = tests = 0.0
    for u in units:
        by_crate[u["name"]] += u["duration"]
        if u["name"] in WORKSPACE:
            ours += u["duration"]
        if "(test)" in u["target"]:
            tests += u["duration"]

    def pct(x: float) -> str:
        return f"{100 * x / total:.0f}%"

    print(f"{args.report}")
    print(f"  {len(units)} units compiled, wall {wall:.0f} s, compile time summed over units {total:.0f} s")
    print(f"  this workspace's crates {ours:.0f} s ({pct(ours)}), dependencies {total - ours:.0f} s ({pct(total - ours)})")
    print(f"  test targets {tests:.0f} s ({pct(tests)})")
    print(f"  the {args.top} slowest crates (all their units):")
    for name, secs in sorted(by_crate.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"    {secs:7.0f} s  {pct(secs):>4}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
