#!/usr/bin/env bash
# Zero to a long-document answer: install, then ask the embedded model about shipped novel chapters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m ltengine qa "$@"
