#!/usr/bin/env bash
# Run every test: the Rust workspace (cargo test) and the Python bindings
# (pytest, in a venv of the repo's own that this script creates and fills).
# Ends with one line: "summary: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo test --workspace --locked 2>&1 | tee "$log"

venv=${DM_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check 'maturin>=1.5,<2' pytest
VIRTUAL_ENV="$(cd "$venv" && pwd)" "$venv/bin/maturin" develop -q -m bindings-python/Cargo.toml
"$venv/bin/pytest" -q -p no:cacheprovider bindings-python/tests 2>&1 | tee -a "$log"

awk '/^test result:/ { p += $4; f += $6; s += $8 }
     /^[0-9]+ (passed|failed|skipped)|, [0-9]+ (passed|failed|skipped)/ && /in [0-9.]+s/ {
       for (i = 1; i <= NF; i++) {
         if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^skipped/) s += $i
       }
     }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s; exit (p == 0 || f > 0) }' "$log"
