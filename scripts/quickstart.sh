#!/usr/bin/env bash
# The main job: sets up .venv if needed, then trains an NTK-parameterised FCN on the bundled digits with
# LinearityMonitor (configs/fcn_digits.yaml). Writes metrics.csv and the report PNGs under runs/fcn_digits/.
# Extra arguments are passed to `lightning-linearity fit` (e.g. --model.width 2048).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
lightning-linearity fit --config fcn_digits "$@"
