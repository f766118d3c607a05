#!/usr/bin/env bash
# What an incremental costs as the disk grows (issue "Performance"): the
# same 10 MiB change, read over NBD with a dirty bitmap, on qcow2 disks of
# each SIZE that hold 4 KiB in every MiB (so every MiB is a chunk of the
# parent point: the per-chunk cost shows). Not part of the test run.
#
#   bash benches/incremental.sh [WORKDIR] [SIZES] [ROUNDS]
#        (default /var/tmp/dm-inc, "4G 16G 64G", 3)
#
# For each size: one full backup, then ROUNDS times: a fresh bitmap, the
# change (2560 writes of 4 KiB spread over the disk), an incremental with
# --bitmap. Prints the median wall seconds, CPU seconds and peak RSS of
# the incremental command, and its cost per chunk of the disk.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-inc}
sizes=${2:-4G 16G 64G}
rounds=${3:-3}
need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }; }
need qemu-nbd qemu-utils; need qemu-io qemu-utils
cargo build --release --quiet --locked -p datamover-cli --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
rm -rf "$work"; mkdir -p "$work"; cd "$work"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; true; }
trap cleanup EXIT
serve() { # serve IMAGE: read-only export of IMAGE with bitmap b0
  rm -f nbd.sock nbd.pid
  qemu-nbd --fork --pid-file=nbd.pid -k "$work/nbd.sock" -x d -t -r -f qcow2 -B b0 "$1"
  pid=$(cat nbd.pid)
}
stop() { kill "$pid"; while [ -e "/proc/$pid" ]; do sleep 0.05; done; pid=; }
uri="nbd+unix:///d?socket=$work/nbd.sock"
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-6s %8s %10s %10s %10s %12s\n' size chunks "wall s" "CPU s" "peak MiB" "µs/chunk"
for size in $sizes; do
  img=$work/disk-$size.qcow2
  qemu-img create -q -f qcow2 "$img" "$size"
  mib=$(( $(qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') >> 20 ))
  # 4 KiB at the start of every MiB, each MiB's its own.
  python3 -c "
for i in range($mib):
    print(f'write -P {i % 251} {i}M 4k')" | qemu-io -f qcow2 "$img" >/dev/null
  qemu-img bitmap --add --enable "$img" b0
  "$dm" init "repo-$size" >/dev/null
  serve "$img"
  "$dm" backup "$uri" --repo "repo-$size" --name vm/d --bitmap b0 --full-if-needed >/dev/null
  stop
  W= C= M=
  for r in $(seq "$rounds"); do
    qemu-img bitmap --remove "$img" b0
    qemu-img bitmap --add --enable "$img" b0
    # 10 MiB: 2560 writes of 4 KiB, spread evenly over the disk.
    python3 -c "
n, mib = 2560, $mib
for k in range(n):
    print(f'write -P {($r * 31 + k) % 251} {(k * mib // n)}M 4k')" | qemu-io -f qcow2 "$img" >/dev/null
    serve "$img"
    out=$( { /usr/bin/time -f '%e %U %S %M' "$dm" backup "$uri" --repo "repo-$size" --name vm/d --bitmap b0 >/dev/null; } 2>&1 | tail -1)
    stop
    read -r e u s m <<<"$out"
    W+="$e "; C+="$(python3 -c "print(round($u + $s, 2))") "; M+="$((m / 1024)) "
  done
  w=$(med "$W")
  printf '%-6s %8s %10s %10s %10s %12s\n' "$size" "$mib" "$w" "$(med "$C")" "$(med "$M")" \
    "$(python3 -c "print(round($w * 1e6 / $mib, 1))")"
  rm -rf "repo-$size" "$img"
done
