#!/usr/bin/env bash
# Install, then run the whole test suite (GPU tests skip with a reason on CPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
