"""Splice the committed benchmark results into README.md, so no number there is typed by hand.

README.md marks each spliced block with

    <!-- results: FILE.md -->             the whole file but its title line
    <!-- results: FILE.md#Heading -->     one section of it (heading excluded, sub-sections kept)
    ...generated text...
    <!-- /results -->

where FILE.md lives in benchmarks/results/ and is written by a benchmark script.

    python benchmarks/update_readme.py            # rewrite README.md
    python benchmarks/update_readme.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<ref>[^>]+?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def heading(line: str) -> tuple[int, str] | None:
    m = re.match(r"(#+)\s+(.*\S)", line)
    return (len(m.group(1)), m.group(2)) if m else None


def extract(ref: str) -> str:
    name, _, title = ref.partition("#")
    path = RESULTS / name
    if not path.exists():
        raise SystemExit(f"README refers to {path}, which does not exist: run the benchmark that writes it")
    lines = path.read_text().splitlines()
    if not title:
        body = lines[1:] if lines and heading(lines[0]) else lines
    else:
        starts = [i for i, line in enumerate(lines) if (h := heading(line)) and h[1] == title]
        if not starts:
            raise SystemExit(f"{path} has no heading {title!r}")
        level, body = heading(lines[starts[0]])[0], []
        for line in lines[starts[0] + 1 :]:
            h = heading(line)
            if h and h[0] <= level:
                break
            body.append(line)
    # Headings inside a spliced block become bold lines so the README's outline stays its own.
    body = [f"**{heading(line)[1]}**" if heading(line) else line for line in body]
    return "\n".join(body).strip() + "\n"


def render(readme: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + extract(m.group("ref")) + m.group(4), readme)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = ap.parse_args()
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(
                "README.md is out of date with benchmarks/results/: run python benchmarks/update_readme.py",
                file=sys.stderr,
            )
            return 1
        return 0
    path.write_text(new)
    print(f"README.md: {len(BLOCK.findall(new))} result blocks spliced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
