#!/usr/bin/env bash
# The GPU checks in one go (a few minutes on one GPU): the CUDA tests (tests/test_cuda.py), then the NTK and
# Hessian benchmarks on the device. Run it on a machine with a CUDA build of torch; it uses .venv when that
# exists, else $PYTHON (default python3) with the package's dependencies installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py="${PYTHON:-python3}"; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
echo "== CUDA tests"
"$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
echo "== Hessian norm: structured vs generic on the GPU"
"$py" benchmarks/hessian.py --device cuda --widths 256 1024 --path-widths 1024 4096 --dag-widths 1024 --probes 4 \
    --max-generic-seconds 60
echo "== NTK: per-module engine vs structured twin vs generic"
"$py" benchmarks/ntk_engine.py --max-seconds 120
