#!/usr/bin/env bash
# ModuleMesh vs Avalanche 0.6.0 on exactly our Split-MNIST split (see benchmarks/avalanche_side.py).
#
#   bash benchmarks/vs_avalanche.sh [--seeds 3]   # writes benchmarks/results/vs_avalanche.{md,json}
#
# Each seed k (0..N-1) exports its own split and both sides train on it with seed k; the table gives
# mean +- std over the seeds. The combined JSON is committed, so the markdown can be re-rendered
# without the work directory: python benchmarks/avalanche_side.py table --from-json
# benchmarks/results/vs_avalanche.json --md benchmarks/results/vs_avalanche.md
#
# Avalanche is not a project dependency: it goes into its own virtual environment outside the
# repository, ${MM_AVALANCHE_VENV:-${TMPDIR:-/tmp}/mm-avalanche-venv}, reused by later runs.
# torch: avalanche-lib requires torchvision. The project's torch 2.13.0 (the local CPU wheel) plus
# PyPI's torchvision 0.28.0 does not import ('operator torchvision::nms does not exist'), so the
# venv gets the torch 2.14.1 + torchvision 0.29.1 pair that pip takes from this machine's local
# wheel store (a CUDA build, ~5.5 GB, run on the CPU here) unless MM_AVALANCHE_TORCH says
# otherwise, e.g. MM_AVALANCHE_TORCH="torch==2.13.0" where a matching torchvision imports.
# The ModuleMesh side runs in the project's Python ($PYTHON, default python3).
set -uo pipefail

SEEDS="${MM_AVALANCHE_SEEDS:-3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS="${2:-}"; shift 2 || shift ;;
    --seeds=*) SEEDS="${1#*=}"; shift ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
    *) echo "vs_avalanche.sh: unknown option '$1'; the only option is --seeds N (e.g. --seeds 3)" >&2; exit 2 ;;
  esac
done
if ! [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then
  echo "vs_avalanche.sh: --seeds needs a whole number >= 1, got '$SEEDS' (e.g. --seeds 3)" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${MM_AVALANCHE_VENV:-${TMPDIR:-/tmp}/mm-avalanche-venv}"
WORK="${MM_AVALANCHE_WORK:-${TMPDIR:-/tmp}/mm-avalanche-work}"
TORCH_SPEC="${MM_AVALANCHE_TORCH:-torch==2.14.1 torchvision==0.29.1}"
MD="$REPO/benchmarks/results/vs_avalanche.md"
SIDE="$REPO/benchmarks/avalanche_side.py"
mkdir -p "$WORK"
rm -f "$WORK/blocker.txt" "$WORK"/avalanche_s*.json "$WORK"/ours_s*.json
NOTES="$WORK/notes.md"
: > "$NOTES"

block() {  # record why Avalanche could not run; the table is still written with our side
  echo "$1" | tee -a "$WORK/blocker.txt" >&2
}

echo "== 1/4 export the Split-MNIST tensors with ModuleMesh's loader and scenario code (seeds 0..$((SEEDS - 1)))"
for ((k = 0; k < SEEDS; k++)); do
  "$PY" "$SIDE" export --seed "$k" --out "$WORK/split_s$k.pt" || { echo "export of seed $k failed" >&2; exit 1; }
done

echo "== 2/4 Avalanche venv: $VENV"
if ! "$VENV/bin/python" -c "import avalanche, torchvision" 2>/dev/null; then
  if ! (cd "$WORK" && pip download --quiet --no-deps avalanche-lib==0.6.0 -d "$WORK/wheels" >"$WORK/download.log" 2>&1); then
    block "pip download --no-deps avalanche-lib==0.6.0 failed: $(tail -3 "$WORK/download.log")"
  else
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || block "python3 -m venv $VENV failed"
    if [ -x "$VENV/bin/pip" ] && [ ! -s "$WORK/blocker.txt" ]; then
      # dry run first: refuse anything that would pull CUDA wheels from the network instead of the local store
      # shellcheck disable=SC2086
      "$VENV/bin/pip" install --dry-run --quiet --report "$WORK/dry_run.json" $TORCH_SPEC avalanche-lib==0.6.0 >"$WORK/dry_run.log" 2>&1 \
        || block "dry run failed: $(grep -v '^WARNING: Location' "$WORK/dry_run.log" | tail -5)"
      if [ ! -s "$WORK/blocker.txt" ]; then
        "$VENV/bin/python" - "$WORK/dry_run.json" <<'EOF' | tee -a "$NOTES"
import json, sys
r = json.load(open(sys.argv[1]))
pick = {i["metadata"]["name"].lower(): (i["metadata"]["version"], i["download_info"]["url"]) for i in r["install"]}
remote_cuda = [n for n, (v, u) in pick.items() if n.startswith("nvidia") and not u.startswith("file:")]
for n in ("torch", "torchvision", "avalanche-lib"):
    if n in pick:
        print(f"- dry run: {n} {pick[n][0]} from {'the local wheel store' if pick[n][1].startswith('file:') else 'PyPI'}")
print(f"- dry run: {len(pick)} packages, {len(remote_cuda)} CUDA runtime wheels from the network")
EOF
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install --quiet $TORCH_SPEC avalanche-lib==0.6.0 >"$WORK/install.log" 2>&1 \
          || block "pip install $TORCH_SPEC avalanche-lib==0.6.0 failed: $(grep -v '^WARNING: Location' "$WORK/install.log" | tail -5)"
        "$VENV/bin/python" -c "import avalanche, torchvision" >"$WORK/import.log" 2>&1 \
          || block "import avalanche failed in the venv: $(tail -3 "$WORK/import.log")"
      fi
    fi
  fi
fi

echo "== 3/4 Avalanche side"
for ((k = 0; k < SEEDS; k++)); do
  [ -s "$WORK/blocker.txt" ] && break
  "$VENV/bin/python" "$SIDE" avalanche --data "$WORK/split_s$k.pt" --out "$WORK/avalanche_s$k.json" \
    2>"$WORK/avalanche_s$k.err" || block "Avalanche run (seed $k) failed: $(tail -5 "$WORK/avalanche_s$k.err")"
done

echo "== 4/4 ModuleMesh side (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
for ((k = 0; k < SEEDS; k++)); do
  "$PY" "$SIDE" ours --data "$WORK/split_s$k.pt" --out "$WORK/ours_s$k.json" \
    || { echo "ModuleMesh side (seed $k) failed" >&2; exit 1; }
done

"$PY" "$SIDE" table --dir "$WORK" --seeds "$SEEDS" --md "$MD" --notes "$NOTES"
