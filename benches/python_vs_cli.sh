#!/usr/bin/env bash
# Python `repo.backup()` vs `dm backup` on the same image: the binding must
# add no cost (target >= 0.97x). Release builds of both; runs alternate, each
# into a fresh repository, warm page cache; prints the median of N runs.
#   bash benches/python_vs_cli.sh IMAGE [RUNS]     (default RUNS=3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
img=$(realpath "$1"); runs=${2:-3}
cd "$here"
cargo build --release --quiet -p datamover-cli
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check 'maturin>=1.5,<2'
VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin develop --release -q -m bindings-python/Cargo.toml
work=$(mktemp -d /var/tmp/dm-pyvcli.XXXX); trap 'rm -rf "$work"' EXIT
cat "$img" > /dev/null
for i in $(seq "$runs"); do
  rm -rf "$work/r"; target/release/dm init "$work/r" > /dev/null
  s=$(date +%s.%N); target/release/dm backup "$img" --repo "$work/r" --name vm/d > /dev/null; e=$(date +%s.%N)
  echo "cli $(echo "$e - $s" | bc)"
  rm -rf "$work/r"
  .venv/bin/python - "$img" "$work/r" <<'PY'
import sys, time, datamover
repo = datamover.Repository.init(sys.argv[2])
t = time.perf_counter(); repo.backup(sys.argv[1], "vm/d"); print("python", time.perf_counter() - t)
PY
done | tee "$work/times"
med() { grep "^$1 " "$work/times" | cut -d' ' -f2 | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
cli=$(med cli); py=$(med python)
printf "median of %d: dm backup %.2f s, Python repo.backup() %.2f s; Python/CLI speed = %.3fx\n" "$runs" "$cli" "$py" "$(echo "$cli / $py" | bc -l)"
