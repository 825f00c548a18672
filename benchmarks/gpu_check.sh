#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): every command on CUDA, Trainer vs a bare loop, the fast
# path's samples/s; writes benchmarks/results/gpu.md naming the GPU. About 6 minutes on one H200.
#
# The GPU machine's python3 has its own CUDA torch; the project's pins do not apply there. Carry
# the few packages it lacks as cp312 wheels in .whl/ (README, "GPU check"); they are installed
# into /tmp/site, never over the machine's own packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: gpu_check.sh is for the GPU machine'"
python3 benchmarks/gpu_check.py --device cuda --out /tmp/modulemesh_gpu_check "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.md /tmp/modulemesh_gpu_check/gpu.json "$OUT"/; fi
