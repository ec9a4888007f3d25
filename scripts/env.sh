#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs what is missing.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run on its own.
# torch is pinned to 2.13.0 first: on these machines that is the CPU build already on disk, and the
# package's own range (torch>=2.2,<3) is then satisfied without pulling CUDA wheels.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating $venv" >&2
    "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[env] installing torch 2.13.0 (CPU) and lightning-linearity[dev] into $venv" >&2
    pip_install() {  # quiet, minus the noise of this machine's local package mirrors
        local log rc=0
        log="$(mktemp)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
        grep -v "is ignored" "$log" >&2 || true
        rm -f "$log"
        return "$rc"
    }
    pip_install "torch==2.13.0"
    pip_install -e "$root[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
