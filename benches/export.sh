#!/usr/bin/env bash
# `dm export` against qemu-nbd serving the same point restored to a raw
# file (issue "Instant VM recovery"), not part of the test run. A 1 GiB
# disk, all data (half random, half text; no two MiB alike, so neither
# dedupe nor our chunk cache shortcut it) is backed up; then,
# both served on unix sockets, warm page cache, medians of ROUNDS
# interleaved rounds:
#   sequential  `nbdcopy URI null:` (four connections): MB/s
#   single      the same with one connection and one request in flight
#               (a reader that waits for each answer: read-ahead matters)
#   random      4 KiB reads at random offsets from 4 connections, one in
#               flight each, for 5 s: reads per second
# for the point backed up with the default 1 MiB blocks and with 256 KiB
# blocks (`--block-size 256K`): a random read checks (decompresses and
# hashes) the whole block it falls in, so the block size sets its cost.
#
#   bash benches/export.sh [WORKDIR] [ROUNDS]   (default /var/tmp/dm-export-bench, 3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-export-bench}
rounds=${2:-3}
need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }; }
need qemu-nbd qemu-utils; need nbdcopy libnbd-bin
cargo build --release --quiet --locked -p datamover-cli -p datamover-benches --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
tool=$here/target/release/nbd-tool
rm -rf "$work"; mkdir -p "$work"; cd "$work"
python3 - <<'P'
import os, random
with open("disk.raw", "wb") as f:
    r = random.Random(7)
    for i in range(512):                      # 512 MiB random
        f.write(r.randbytes(1 << 20))
    for i in range(512):                      # 512 MiB text, every MiB its own
        t = b"".join(b"MiB %04d line %08d of a text file in the guest\n" % (i, n) for n in range(24000))
        f.write(t[: 1 << 20].ljust(1 << 20, b"."))
P
"$dm" init repo >/dev/null
"$dm" backup disk.raw --repo repo --name vm/disk >/dev/null
"$dm" init repo256 >/dev/null
"$dm" backup disk.raw --repo repo256 --name vm/disk --block-size 256K >/dev/null
"$dm" restore vm/disk restored.raw --repo repo >/dev/null
data=$((1 << 30))
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
qemu-nbd --fork --pid-file=qemu.pid -k "$work/qemu.sock" -x disk -t -r -f raw restored.raw
pids+=("$(cat qemu.pid)")
"$dm" export vm/disk --repo repo --listen "unix:$work/dm.sock" >dm.uri 2>dm.log &
pids+=($!)
"$dm" export vm/disk --repo repo256 --listen "unix:$work/dm256.sock" >dm256.uri 2>dm256.log &
pids+=($!)
for _ in $(seq 100); do [ -s dm.uri ] && [ -s dm256.uri ] && break; sleep 0.1; done
qemu_uri="nbd+unix:///disk?socket=$work/qemu.sock"
dm_uri=$(head -1 dm.uri)
dm256_uri=$(head -1 dm256.uri)

declare -A S R Q
for r in $(seq "$rounds"); do
  for who in qemu dm dm256; do
    uri=${who}_uri
    t0=$(date +%s.%N); nbdcopy "${!uri}" null: ; t1=$(date +%s.%N)
    S[$who]+="$(python3 -c "print(round($data / ($t1 - $t0) / 1e6))") "
    t0=$(date +%s.%N); nbdcopy --connections=1 --requests=1 "${!uri}" null: ; t1=$(date +%s.%N)
    Q[$who]+="$(python3 -c "print(round($data / ($t1 - $t0) / 1e6))") "
    R[$who]+="$("$tool" randread "${!uri}" 5 4 | python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])') "
  done
done
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "1 GiB disk of data, unix sockets, warm cache, medians of $rounds rounds"
printf '%-10s %16s %16s %18s\n' server "sequential MB/s" "single MB/s" "random 4K reads/s"
declare -A NAME=([qemu]=qemu-nbd [dm]="dm export" [dm256]="dm, 256K")
for who in qemu dm dm256; do
  printf '%-10s %16s %16s %18s\n' "${NAME[$who]}" "$(med "${S[$who]}")" "$(med "${Q[$who]}")" "$(med "${R[$who]}")"
done
ratio() { python3 -c "print(round($(med "$1") / $(med "$2"), 2))"; }
for who in dm dm256; do
  echo "${NAME[$who]}/qemu-nbd: sequential $(ratio "${S[$who]}" "${S[qemu]}")x, single $(ratio "${Q[$who]}" "${Q[qemu]}")x, random $(ratio "${R[$who]}" "${R[qemu]}")x"
done
