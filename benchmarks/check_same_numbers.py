"""Same numbers before and after a refactor: run a few fast, seeded CLI experiments against one
source tree and record every number they write; compare two such records.

    # record (``--src`` is the ``src/`` directory whose ``modulemesh`` is imported)
    python benchmarks/check_same_numbers.py record --src /tmp/before/src --out before.json
    python benchmarks/check_same_numbers.py record --src src --out after.json
    # compare: exit 0 when identical, 1 with the differing keys listed
    python benchmarks/check_same_numbers.py compare before.json after.json
    # both in one go against a git revision (exported with `git archive`), result as markdown
    python benchmarks/check_same_numbers.py check --before 7054f42 --md benchmarks/results/same_numbers.md

What is recorded per case: every JSON / YAML / CSV file the run wrote (numbers kept exactly, as
JSON floats; wall-clock times, peak memory and paths dropped, since they differ between any two
runs) and a sha256 of every tensor in every safetensors file (the trained weights themselves).
Runs use one thread and the CPU, so the same code gives bit-identical numbers.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Keys whose values are wall-clock or machine dependent (seconds, memory, dates, host paths).
VOLATILE = re.compile(
    r"(^|_)(seconds|time|times|wall|wall_time_s|wall_time|peak_memory_mb|peak_memory|date|created|"
    r"timestamp|elapsed|duration|hostname|path|out|cache_dir|speed|samples_per_s|per_s|s)$|_s$|seconds|memory|time_s"
)

# name -> (argv after `modulemesh`, with {out} and {cfg} placeholders)
CASES: dict[str, list[str]] = {
    "run_default_digits": ["run", "--set", "data.name=digits", "--set", "train.epochs=1", "--out", "{out}", "--quiet"],
    "run_split_digits_der": ["run", "{cfg}/split_digits.yaml", "--out", "{out}", "--quiet"],
    "upgrade_digits": [
        "upgrade",
        "--from",
        "{out}/teacher",
        "--train-teacher",
        "{cfg}/upgrade_teacher_mlp.yaml",
        "--data",
        "digits",
        "--to",
        "{cfg}/upgrade_mlp_wider_deeper.yaml",
        "--steps",
        "60",
        "--set",
        "transfer.fisher_samples=300",
        "--out",
        "{out}/upgrade",
        "--quiet",
    ],
    "m2mkd_small": [
        "m2mkd",
        "--set",
        "data.name=digits",
        "--set",
        "data.test_subset=300",
        "--teacher",
        "vit:dim=16,depth=2,heads=2",
        "--student",
        "moe_vit:dim=12,depth=2,heads=2,experts=2,k=1",
        "--modules",
        "2",
        "--set",
        "teacher.steps=30",
        "--set",
        "meta.steps=20",
        "--set",
        "teacher.adapt_steps=10",
        "--set",
        "distill.steps=20",
        "--set",
        "assemble.finetune_steps=10",
        "--set",
        "optim.batch_size=32",
        "--out",
        "{out}",
        "--quiet",
    ],
    "compare_small": [
        "compare",
        "{cfg}/split_digits.yaml",
        "--strategies",
        "all",
        "--seeds",
        "2",
        "--set",
        "train.epochs=1",
        "--out",
        "{out}",
        "--quiet",
    ],
}


def _volatile(key: str) -> bool:
    return bool(VOLATILE.search(re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")))


def _clean(value, out: str):
    if isinstance(value, dict):
        return {k: _clean(v, out) for k, v in sorted(value.items()) if not _volatile(str(k))}
    if isinstance(value, list):
        return [_clean(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(out, "<out>")
    return value


def _tensor_digest(path: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

    return {name: digest(t) for name, t in sorted(load_file(str(path)).items())}


def _collect(out: Path) -> dict:
    found: dict = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if not p.is_file() or "cache" in rel.split(os.sep)[0]:
            continue
        if p.suffix == ".json":
            found[rel] = _clean(json.loads(p.read_text()), str(out))
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            found[rel] = _clean(yaml.safe_load(p.read_text()), str(out))
        elif p.suffix == ".csv":
            with p.open(newline="") as f:
                rows = list(csv.DictReader(f))
            found[rel] = [_clean(r, str(out)) for r in rows]
        elif p.suffix == ".safetensors":
            found[rel] = _tensor_digest(p)
    return found


def record(src: Path, out_json: Path, cases: list[str]) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(src.resolve()),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    result: dict = {"src": "<src>", "cases": {}}
    with tempfile.TemporaryDirectory(prefix="same_numbers_") as tmp:
        for name in cases:
            out = Path(tmp) / name
            argv = [a.format(out=out, cfg=ROOT / "configs") for a in CASES[name]]
            proc = subprocess.run(
                [sys.executable, "-m", "modulemesh.cli", *argv], env=env, cwd=tmp, capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"case {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            result["cases"][name] = _collect(out)
            print(f"recorded {name}: {len(result['cases'][name])} files", file=sys.stderr)
    out_json.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += diff(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]} != {str(b)[:80]}"]


def check(before: str, cases: list[str], md: Path | None) -> int:
    """Record ``cases`` with the source of git revision ``before`` and with this tree's, compare, report."""
    import datetime
    import platform

    with tempfile.TemporaryDirectory(prefix="same_numbers_src_") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", before], capture_output=True)
        if archive.returncode != 0:
            why = archive.stderr.decode().strip()
            print(f"check_same_numbers: git archive {before} failed: {why}", file=sys.stderr)
            return 2
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        first = record(Path(tmp) / "src", Path(tmp) / "before.json", cases)
        second = record(ROOT / "src", Path(tmp) / "after.json", cases)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "src")
    rows, all_same = [], True
    for name in cases:
        a, b = _clean(first["cases"][name], "<out>"), _clean(second["cases"][name], "<out>")
        d = diff(a, b)
        all_same &= not d
        weights = sum(1 for k in a if k.endswith(".safetensors"))
        rows.append(
            f"| {name} | `modulemesh {' '.join(CASES[name])}` | {len(a)} | {weights} | "
            f"{'identical' if not d else f'{len(d)} differences: ' + '; '.join(d[:3])} |"
        )
    text = "\n".join(
        [
            "# Same numbers before and after the restructuring",
            "",
            f"Seeded CPU runs of the code at `{before}` and at `{head}{' + uncommitted changes' if dirty else ''}`, "
            f"one torch thread, {platform.machine()}, {datetime.date.today().isoformat()}. Every JSON/YAML/CSV "
            "file a run "
            "writes is compared number by number (wall times, memory and paths left out) and every tensor of every "
            "safetensors file by its sha256.",
            "",
            f"    python benchmarks/check_same_numbers.py check --before {before} --md "
            "benchmarks/results/same_numbers.md",
            "",
            "| case | command (`{out}`: a temporary directory, `{cfg}`: configs/) | files compared | weight files "
            "| result |",
            "|---|---|---:|---:|---|",
            *rows,
            "",
            f"**{'All identical.' if all_same else 'Differences found.'}**",
            "",
        ]
    )
    if md is not None:
        md.write_text(text)
    print(text)
    return 0 if all_same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--src", type=Path, default=ROOT / "src")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    c = sub.add_parser("compare")
    c.add_argument("first", type=Path)
    c.add_argument("second", type=Path)
    k = sub.add_parser("check")
    k.add_argument("--before", default="7054f42", help="git revision of the code before the move")
    k.add_argument("--cases", default=",".join(CASES))
    k.add_argument("--md", type=Path, help="write the result table here")
    args = p.parse_args(argv)
    if args.cmd in ("record", "check"):
        unknown = [n for n in args.cases.split(",") if n not in CASES]
        if unknown:
            print(f"check_same_numbers: unknown case(s) {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
            return 2
    if args.cmd == "check":
        return check(args.before, args.cases.split(","), args.md)
    if args.cmd == "record":
        record(args.src, args.out, args.cases.split(","))
        return 0
    first, second = json.loads(args.first.read_text()), json.loads(args.second.read_text())
    # cleaned again, so a record taken with an older list of volatile keys compares under the current one
    differences = diff(_clean(first["cases"], "<out>"), _clean(second["cases"], "<out>"))
    n_files = sum(len(v) for v in first["cases"].values())
    if differences:
        print(f"{len(differences)} difference(s):\n" + "\n".join(differences[:200]))
        return 1
    print(f"identical: {len(first['cases'])} cases, {n_files} files (metrics, results, weight hashes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
