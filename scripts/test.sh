#!/usr/bin/env bash
# Install everything, lint, and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# System packages some tests drive: Debian's chromium (tests/test_review_page.py, the browser test) and a
# PostgreSQL server (tests/test_postgres.py, the audit store shared by replicas). Installed when missing and
# allowed (root or password-less sudo); otherwise those tests skip with the reason (and fail when CI is set).
MISSING=()
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  MISSING+=(postgresql)
fi
if [ "${#MISSING[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="-"; fi
  if [ "$SUDO" != "-" ]; then
    { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${MISSING[@]}"; } >/dev/null \
      || echo "test.sh: installing ${MISSING[*]} failed; their tests will skip (fail under CI)" >&2
  else
    echo "test.sh: ${MISSING[*]} missing and neither root nor sudo is available; their tests will skip" >&2
  fi
fi
.venv/bin/ruff check .
# Known vulnerabilities in the installed packages (pip-audit; RISKSCORE_PIP_AUDIT=0 skips it). Policy
# (docs/SECURITY.md): advisories with a fixed release fail the run, advisories without a fix are printed as
# warnings only, an unreachable vulnerability service only warns (the summary line says how many were audited).
if [ "${RISKSCORE_PIP_AUDIT:-1}" = 1 ]; then
  .venv/bin/python scripts/pip_audit.py
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
