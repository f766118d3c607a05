#!/usr/bin/env bash
# End-to-end benchmark of the server architecture (issue #5), not part of
# the test run: the same disk backed up
#   1. by `dm backup` alone into a local repository;
#   2. by a server job on a source proxy into a repository on the same
#      path (shared storage, no repository service);
#   3. by a server job on a source proxy through the repository service of
#      a target proxy (dmrs/1 over mutual TLS on loopback);
# and, for 3, the bytes on the wire of a second full backup of the
# unchanged disk against the size of its manifest (the point file).
#
#   [ROUNDS=3] [PERF=DIR] bash benches/server.sh [WORKDIR] [DISK]   (default /var/tmp/dm-server-bench;
#                                             DISK: a 2 GiB mixed image made there)
#
# Task time is the data mover's (task started -> finished, as the server
# records it); wall time includes placement and heartbeats.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-server-bench}
disk=${2:-}
mkdir -p "$work"
cargo build --release --quiet --locked -p datamover-cli -p datamover-server -p datamover-proxy \
  --manifest-path "$here/Cargo.toml"
bin=$here/target/release
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

if [ -z "$disk" ]; then
  disk=$work/images/disk.raw
  if [ ! -f "$disk" ]; then
    mkdir -p "$work/images"
    # 1 GiB incompressible, 512 MiB of text (compresses ~4x), 512 MiB hole.
    { head -c 1024M /dev/urandom; head -c 512M < <(yes "datamover server benchmark line $RANDOM"); } > "$disk.tmp"
    truncate -s 2G "$disk.tmp"; mv "$disk.tmp" "$disk"
  fi
fi
size=$(stat -c %s "$disk")
mib() { python3 -c "print(f'{$1/1048576:.1f}')"; }
# Every run starts alike: the other runs' repositories deleted, the page
# cache dropped (as root) and the disk read once into it. On a VM, page
# cache that needs memory the guest never touched costs 3-6x the CPU of
# recycled memory (dd of 1 GiB here: 1.9-3.3 s of system time against
# 0.3-0.6 s), which would otherwise favour whichever run comes first.
warm() {
  sync
  [ "$(id -u)" = 0 ] && echo 3 > /proc/sys/vm/drop_caches
  cat "$disk" > /dev/null
}

# The server and two proxies on loopback.
source "$here/benches/lib/service.sh"
service_up "$work" "$disk"
# Run a job (after warming the cache); print "task_seconds wall_seconds wire_bytes bytes_stored".
run() { warm; run_job "$1"; }
# Rounds of the three first fulls, interleaved, each into a new
# repository; the medians are reported.
rounds=${ROUNDS:-3}
alone() {
  rm -rf "$work/alone"; "$bin/dm" init "$work/alone" >/dev/null
  warm
  "$bin/dm" backup "$disk" --repo "$work/alone" --name bench/vda --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])'
  rm -rf "$work/alone"
}
A=(); SH=(); SV=(); SRC=(); TGT=()
for r in $(seq "$rounds"); do
  A+=("$(alone)")
  read -r t _ _ _ <<< "$(run viashared)"; SH+=("$t"); rm -rf "$work/shared"
  rm -rf "$work/vault"
  c0_src=$(cpu "$src_pid"); c0_tgt=$(cpu "$tgt_pid")
  # PERF=DIR: profiles of both proxies during the last round's job
  # (perf report -i DIR/src.data, DIR/tgt.data).
  prof=()
  if [ -n "${PERF:-}" ] && [ "$r" = "$rounds" ]; then
    mkdir -p "$PERF"
    perf record -q ${PERF_CG:--g} -p "$src_pid" -o "$PERF/src.data" 2>/dev/null & prof+=($!)
    perf record -q ${PERF_CG:--g} -p "$tgt_pid" -o "$PERF/tgt.data" 2>/dev/null & prof+=($!)
    sleep 0.5
  fi
  read -r t _ sv_wire sv_stored <<< "$(run viaservice)"; SV+=("$t")
  for p in "${prof[@]}"; do kill -INT "$p"; wait "$p" || true; done
  SRC+=("$(python3 -c "print(f'{$(cpu "$src_pid")-$c0_src:.2f}')")")
  TGT+=("$(python3 -c "print(f'{$(cpu "$tgt_pid")-$c0_tgt:.2f}')")")
done
med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
alone_s=$(med "${A[@]}"); sh_s=$(med "${SH[@]}"); sv_s=$(med "${SV[@]}")
# Second full of the unchanged disk through the service.
read -r sv2_s _ sv2_wire _ <<< "$(run viaservice)"
manifest=$(ls -t "$work"/vault/points/bench/vda/*.point | head -1)
msize=$(stat -c %s "$manifest")
"$bin/dm" restore bench/vda "$work/restored.raw" --repo "$work/vault" --force >/dev/null
cmp "$disk" "$work/restored.raw" && rm -f "$work/restored.raw"

rate() { python3 -c "print(f'{$size/1048576/$1:.0f}')"; }
echo "disk: $(mib "$size") MiB ($disk), $(nproc) cores; medians of $rounds rounds (task seconds: ${A[*]} | ${SH[*]} | ${SV[*]})"
printf '%-44s %9s %10s %8s\n' path task_s MiB/s vs_alone
row() { printf '%-44s %9s %10s %8s\n' "$1" "$2" "$(rate "$2")" "$(python3 -c "print(f'{$alone_s/$2:.2f}')")"; }
row "dm backup alone (local repository)" "$alone_s"
row "server job, proxy -> shared repository" "$sh_s"
row "server job, proxy -> repository service" "$sv_s"
echo
echo "first full via the service: $sv_wire bytes on the wire, $sv_stored stored;" \
  "CPU seconds per run: source proxy ${SRC[*]}, target proxy ${TGT[*]}"
echo "second full, unchanged disk: $sv2_wire bytes on the wire ($sv2_s s); manifest (point file) $msize bytes"
