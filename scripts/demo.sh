#!/usr/bin/env bash
# Install riskscore and run the main job end to end on synthetic data (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/riskscore demo "$@"
