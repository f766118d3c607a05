#!/usr/bin/env bash
# Every figure of issue "Performance" side by side with its peer, in one
# run. Not part of the test run. Needs root (loop mounts), qemu-utils,
# libnbd-bin (nbdcopy), restic, borgbackup, time, curl.
#
#   [ROUNDS=3] [PAIRS=3] [INC_SIZES="16G 1T"] bash benches/all.sh [WORKDIR]   (default /var/tmp/dm-all)
#
# Data: the comparison image (benches/comparison-image.sh: v1.raw, a 4 GiB
# ext4 disk with an OS tree, incompressible files, duplicates, a log and
# zeros; v2.raw, 5 % of it changed), built once in WORKDIR/img; and, for
# the cost of an incremental as the disk grows, qcow2 disks of each
# INC_SIZES (sizes as 16G, 1T) with 4 KiB written in every MiB (4 KiB
# clusters), built once (for 1 TiB, a raw file converted and a full backup
# of a million chunks: minutes).
#
# ROUNDS rounds, each measuring everything once in the same order
# (interleaved: a slow minute of this VM hits dm and its peer alike; the
# short NBD reads and exports run PAIRS times a round, 3 by default,
# taking turns at going first); the table shows the medians of wall
# seconds, CPU seconds (user + system of the process, or of both proxies
# for the repository service) and peak RSS. Page cache is warm: a disk
# is read once before a run reads it.
#
#   backup, incremental (no CBT), restore   dm vs restic and borg (file)
#   replica sync                            dm replica sync, first and next
#   NBD read to nowhere                     nbd-tool read vs nbdcopy (unix
#                                           socket; TCP with 4 connections)
#   full backup over NBD                    vs the same from the file
#   CBT incremental over NBD                vs restic's second backup
#   incremental as the disk grows           the same 10 MiB change on each
#                                           INC_SIZES disk (--bitmap)
#   export                                  nbdcopy from dm export vs from
#                                           qemu-nbd serving the restore; and
#                                           the largest INC_SIZES point (RSS)
#   repository service                      a server job on one proxy into
#                                           another's repository service vs
#                                           dm backup into a local one
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-all}
rounds=${ROUNDS:-3}
inc_sizes=${INC_SIZES:-16G 1T}
need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }; }
need qemu-nbd qemu-utils; need qemu-io qemu-utils; need nbdcopy libnbd-bin; need restic restic
need borg borgbackup; need /usr/bin/time time; need curl curl
[ "$(id -u)" = 0 ] || { echo "run as root (loop mounts, dropping caches)" >&2; exit 1; }
cargo build --release --quiet --locked -p datamover-cli -p datamover-benches -p datamover-server \
  -p datamover-proxy --manifest-path "$here/Cargo.toml"
bin=$here/target/release; dm=$bin/dm; tool=$bin/nbd-tool
mkdir -p "$work/img" "$work/log"
bash "$here/benches/comparison-image.sh" "$work/img" >/dev/null
v1=$work/img/v1.raw; v2=$work/img/v2.raw
cd "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
nbd_dir=$work
source "$here/benches/lib/nbd.sh"
source "$here/benches/lib/service.sh"
export RESTIC_PASSWORD=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

results=$work/results.tsv; : > "$results"
# rec KEY WALL CPU RSS_KIB [EXTRA]: one measurement of this round.
rec() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$1" "$2" "$3" "$4" "${5:-}" >> "$results"; }
# m KEY CMD...: run CMD, record its wall and CPU seconds and peak RSS.
# Each starts from a settled disk: writeback left by the previous step
# (gigabytes after a restore or a backup) is flushed before the clock
# starts, so no measurement pays for another's writes (dm's full backup
# took 6.1 s after restic's restore and 3.8 s after a sync).
m() {
  local key=$1 e u s r; shift
  sync
  /usr/bin/time -f '%e %U %S %M' -o time.out "$@" > "log/$key.out" 2> "log/$key.err" ||
    { echo "$key failed: $*" >&2; tail -5 "log/$key.err" >&2; exit 1; }
  read -r e u s r < <(tail -1 time.out)
  rec "$key" "$e" "$(python3 -c "print(round($u + $s, 2))")" "$r" "${EXTRA:-}"
}
warm() { cat "$@" > /dev/null; }
# in_turn A B: the measurements held in arrays A and B (KEY CMD...), PAIRS
# times each (default 3), after one unmeasured run of B, taking turns at
# going first: whichever goes first after a step that leaves the machine
# busy pays for it (dm's NBD read, always first, took 2.44, 1.53 and 3.54
# s against nbdcopy's 2.17, 1.61 and 1.61; without the warm-up run, the
# first of the two took 1.93/2.10/1.65 s, the second 1.25/1.23/0.91 s,
# whichever it was). These reads last a second and scatter by 2x on this
# VM (qemu-nbd's own CPU for the same reads: 0.8 to 2.5 s), hence more
# samples than rounds.
pairs=${PAIRS:-3}
in_turn() {
  local -n first=$1 second=$2
  local p
  "${second[@]:1}" > /dev/null 2>&1 || true
  for p in $(seq "$pairs"); do
    if (( (round + p) % 2 )); then m "${second[@]}"; m "${first[@]}"; else m "${first[@]}"; m "${second[@]}"; fi
  done
}
size_of() { du -sb "$1" | cut -f1; }

echo "== setting up (once)"
# CBT: v1 as a qcow2 with an enabled bitmap, a full backup with --bitmap,
# then the v1 -> v2 change written into it through NBD (the bitmap
# records it). Each round copies the repository as the full left it.
if [ ! -f cbt.qcow2 ] || [ ! -d cbt-base ]; then
  rm -rf cbt.qcow2 cbt-base
  qemu-img convert -O qcow2 "$v1" cbt.qcow2
  qemu-img bitmap --add --enable cbt.qcow2 b0
  "$dm" init cbt-base >/dev/null
  serve cbt -r -f qcow2 -B b0 cbt.qcow2
  "$dm" backup "$(uri cbt)" --repo cbt-base --name vm/d --bitmap b0 --full-if-needed >/dev/null
  stop cbt
  serve w -f qcow2 cbt.qcow2
  "$tool" apply-diff "$v1" "$v2" "$(uri w)" > log/apply-diff.json
  stop w
fi
# Incremental as the disk grows: 4 KiB at the start of every MiB (so each
# MiB is a chunk of its own in the full), one full backup with --bitmap.
declare -A mib_of
for size in $inc_sizes; do
  img=inc-$size.qcow2
  if [ ! -f "$img" ] || [ ! -d "inc-$size-repo" ]; then
    rm -rf "$img" "inc-$size-repo"
    # Written raw, then converted (qemu-io's writes take 15 min for 1 TiB).
    python3 - "$size" <<'MAKE'
import os, sys
size = int(sys.argv[1][:-1]) << {"G": 30, "T": 40}[sys.argv[1][-1]]
fd = os.open("inc.raw", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
os.ftruncate(fd, size)
for i in range(size >> 20):
    os.pwrite(fd, bytes([i % 251]) * 4096, i << 20)
os.close(fd)
MAKE
    qemu-img convert -f raw -O qcow2 -o cluster_size=4096 inc.raw "$img"
    rm -f inc.raw
    qemu-img bitmap --add --enable "$img" b0
    "$dm" init "inc-$size-repo" >/dev/null
    serve inc -r -f qcow2 -B b0 "$img"
    "$dm" backup "$(uri inc)" --repo "inc-$size-repo" --name vm/d --bitmap b0 --full-if-needed >/dev/null
    stop inc
  fi
  mib_of[$size]=$(( $(qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') >> 20 ))
done
# Long-lived servers: qemu-nbd of v1 on a unix socket and on TCP with 4
# connections; the server and two proxies of the repository service.
serve v1 -r -f raw "$v1"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -f tcp.pid
qemu-nbd --fork --pid-file=tcp.pid -b 127.0.0.1 -p "$port" -x disk -t -r -f raw -e 4 "$v1"
pids+=("$(cat tcp.pid)")
tcp="nbd://127.0.0.1:$port/disk"
mkdir -p svc; service_up "$work/svc" "$v1"

for round in $(seq "$rounds"); do
  echo "== round $round of $rounds"
  # Backup, incremental, restore: dm, restic, borg, each into a new repository.
  rm -rf dm-repo restic-repo borg-repo restore-* replicas cur; mkdir -p cur restore-borg
  "$dm" init dm-repo >/dev/null
  warm "$v1"; m dm-full "$dm" backup "$v1" --repo dm-repo --name vm/disk
  m dm-sync-first "$dm" replica sync vm --repo dm-repo --replicas replicas
  warm "$v2"; m dm-inc "$dm" backup "$v2" --repo dm-repo --name vm/disk
  m dm-sync-next "$dm" replica sync vm --repo dm-repo --replicas replicas
  m dm-restore "$dm" restore vm/disk restore-dm.raw --repo dm-repo
  rec dm-repo-size 0 0 0 "$(size_of dm-repo)"
  restic init -q --repo restic-repo
  ln -f "$v1" cur/disk.raw; warm cur/disk.raw; m restic-full restic -q --repo restic-repo backup cur/disk.raw
  ln -f "$v2" cur/disk.raw; warm cur/disk.raw; m restic-inc restic -q --repo restic-repo backup cur/disk.raw
  m restic-restore restic -q --repo restic-repo restore latest --target restore-restic
  rec restic-repo-size 0 0 0 "$(size_of restic-repo)"
  borg init -e none borg-repo
  ln -f "$v1" cur/disk.raw; warm cur/disk.raw; m borg-full borg create borg-repo::v1 cur/disk.raw
  ln -f "$v2" cur/disk.raw; warm cur/disk.raw; m borg-inc borg create borg-repo::v2 cur/disk.raw
  m borg-restore sh -c "cd restore-borg && borg extract --sparse ../borg-repo::v2"
  rec borg-repo-size 0 0 0 "$(size_of borg-repo)"
  if [ "$round" = 1 ]; then
    cmp "$v2" restore-dm.raw; cmp "$v2" restore-restic/cur/disk.raw; cmp "$v2" restore-borg/cur/disk.raw
    cmp "$v2" replicas/vm/disk.img
    echo "   restores of dm, restic, borg and dm's replica equal v2.raw"
  fi
  rm -rf restore-* restic-repo borg-repo replicas

  # NBD read to nowhere, and full backups over NBD. The restores just
  # removed leave gigabytes of writeback: done first, so the first read
  # measured does not pay for it (it did: 0.52x nbdcopy against 0.98x).
  sync
  warm "$v1"
  ours=(nbd-read "$tool" read "$(uri v1)"); peer=(nbdcopy-read nbdcopy "$(uri v1)" null:)
  in_turn ours peer
  ours=(nbd-read-tcp4 "$tool" read "$tcp"); peer=(nbdcopy-read-tcp4 nbdcopy "$tcp" null:)
  in_turn ours peer
  rm -rf nbd-repo; "$dm" init nbd-repo >/dev/null
  m dm-full-nbd "$dm" backup "$(uri v1)" --repo nbd-repo --name vm/disk
  rm -rf nbd-repo; "$dm" init nbd-repo >/dev/null
  m dm-full-nbd-tcp4 "$dm" backup "$tcp" --repo nbd-repo --name vm/disk
  rm -rf nbd-repo

  # CBT incremental of the v1 -> v2 change.
  rm -rf cbt-repo; cp -a cbt-base cbt-repo
  serve cbt -r -f qcow2 -B b0 cbt.qcow2
  m dm-cbt "$dm" backup "$(uri cbt)" --repo cbt-repo --name vm/d --bitmap b0
  stop cbt
  if [ "$round" = 1 ]; then
    "$dm" restore vm/d cbt.raw --repo cbt-repo >/dev/null
    cmp "$v2" cbt.raw && echo "   the CBT incremental restores equal to v2.raw"; rm -f cbt.raw
  fi
  rm -rf cbt-repo

  # The same 10 MiB change (2560 writes of 4 KiB spread over the disk) on
  # each size, under a fresh bitmap.
  for size in $inc_sizes; do
    img=inc-$size.qcow2
    qemu-img bitmap --remove "$img" b0
    qemu-img bitmap --add --enable "$img" b0
    python3 -c "
n, mib = 2560, ${mib_of[$size]}
for k in range(n):
    print(f'write -P {($round * 31 + k) % 251} {(k * mib // n)}M 4k')" | qemu-io -t unsafe -f qcow2 "$img" >/dev/null
    serve inc -r -f qcow2 -B b0 "$img"
    m "inc-$size" "$dm" backup "$(uri inc)" --repo "inc-$size-repo" --name vm/d --bitmap b0
    stop inc
  done

  # The largest disk's newest point exported and read whole: the export's
  # memory as the disk grows (its extents are read from the manifest by
  # blocks, not held).
  big=${inc_sizes##* }
  rm -f export-big.uri
  "$dm" export vm/d --repo "inc-$big-repo" --listen "unix:$work/export-big.sock" > export-big.uri 2> log/export-big.err &
  epid=$!; pids+=("$epid")
  for _ in $(seq 300); do [ -s export-big.uri ] && break; sleep 0.1; done
  m export-big nbdcopy "$(head -1 export-big.uri)" null:
  rec export-big-rss 0 "$(cpu "$epid")" "$(awk '/VmHWM/ {print $2}' "/proc/$epid/status")"
  kill "$epid"; wait "$epid" 2>/dev/null || true

  # Export: the v2 point (kept in dm-repo) served by dm export and, as a
  # raw file, by qemu-nbd; read whole by nbdcopy.
  "$dm" restore vm/disk export.raw --repo dm-repo >/dev/null
  serve raw -r -f raw export.raw
  "$dm" export vm/disk --repo dm-repo --listen "unix:$work/export.sock" > export.uri 2> log/export.err &
  epid=$!; pids+=("$epid")
  for _ in $(seq 100); do [ -s export.uri ] && break; sleep 0.1; done
  warm export.raw
  ours=(export-dm nbdcopy "$(head -1 export.uri)" null:); peer=(export-qemu-nbd nbdcopy "$(uri raw)" null:)
  in_turn ours peer
  rec export-dm-rss 0 0 "$(awk '/VmHWM/ {print $2}' "/proc/$epid/status")"
  kill "$epid"; wait "$epid" 2>/dev/null || true
  stop raw; rm -f export.raw

  # Repository service: the same v1, with the page cache dropped and the
  # disk read once before each (see benches/server.sh).
  rm -rf svc/alone svc/vault
  sync; echo 3 > /proc/sys/vm/drop_caches; warm "$v1"
  "$dm" init svc/alone >/dev/null
  m svc-alone "$dm" backup "$v1" --repo svc/alone --name bench/vda
  rm -rf svc/alone
  sync; echo 3 > /proc/sys/vm/drop_caches; warm "$v1"
  c0=$(python3 -c "print($(cpu "$src_pid") + $(cpu "$tgt_pid"))")
  read -r task _ wire _ <<< "$(run_job viaservice)"
  rec svc-service "$task" "$(python3 -c "print(round($(cpu "$src_pid") + $(cpu "$tgt_pid") - $c0, 2))")" \
    "$(awk '/VmHWM/ {print $2}' "/proc/$tgt_pid/status")" "$wire"
  # A second full of the unchanged disk: about one manifest on the wire.
  read -r task _ wire _ <<< "$(run_job viaservice)"
  manifest=$(ls -t svc/vault/points/bench/vda/*.point | head -1)
  rec svc-unchanged "$task" 0 0 "$wire $(stat -c %s "$manifest")"
done
rm -rf dm-repo

echo
python3 - "$results" "$rounds" "$(stat -c %s "$v1")" "$inc_sizes" "$pairs" <<'PY'
import statistics, sys
from collections import defaultdict
path, rounds, logical, sizes, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(), int(sys.argv[5])
v = defaultdict(lambda: defaultdict(list))
for line in open(path):
    rnd, key, wall, cpu, rss, extra = line.rstrip("\n").split("\t")
    for name, x in (("wall", wall), ("cpu", cpu), ("rss", rss)):
        v[key][name].append(float(x))
    v[key]["extra"].append(extra)
med = lambda key, f: statistics.median(v[key][f])
mib = lambda kib: f"{kib / 1024:.0f} MiB" if kib else ""
def cell(key):
    if key not in v:
        return "", "", ""
    return f"{med(key, 'wall'):.2f}", f"{med(key, 'cpu'):.2f}", mib(med(key, "rss"))
def row(what, dm, peer, peer_name, target=""):
    a, b = cell(dm), cell(peer) if peer else ("", "", "")
    ratio = f"{med(peer, 'wall') / med(dm, 'wall'):.2f}x" if peer and peer in v else ""
    print(f"| {what} | {' | '.join(a)} | {peer_name} | {' | '.join(b)} | {ratio} | {target} |")
print(f"v1: {logical >> 20} MiB comparison image; medians of {rounds} interleaved rounds "
      f"(NBD reads and exports: of {rounds * pairs} runs, {pairs} pairs in turn per round); "
      "s = wall seconds, CPU = user + system seconds, RSS = peak; "
      "x = peer's seconds / dm's (above 1: dm is faster)")
print()
print("| measure | dm s | dm CPU | dm RSS | peer | peer s | peer CPU | peer RSS | x | target |")
print("|---|---|---|---|---|---|---|---|---|---|")
row("full backup v1 (file)", "dm-full", "restic-full", "restic", "≥ 4.5x restic")
row("full backup v1 (file)", "dm-full", "borg-full", "borg")
row("incremental v2 (file, no CBT)", "dm-inc", "restic-inc", "restic")
row("incremental v2 (file, no CBT)", "dm-inc", "borg-inc", "borg")
row("restore v2", "dm-restore", "restic-restore", "restic")
row("restore v2", "dm-restore", "borg-restore", "borg")
row("replica sync, first (v1)", "dm-sync-first", "dm-restore", "dm restore v2")
row("replica sync, next (v1 -> v2)", "dm-sync-next", "", "")
row("NBD read to nowhere, unix socket", "nbd-read", "nbdcopy-read", "nbdcopy", "≥ 0.9x")
row("NBD read to nowhere, TCP, 4 connections", "nbd-read-tcp4", "nbdcopy-read-tcp4", "nbdcopy", "≥ 0.9x")
row("full backup v1 over NBD (unix)", "dm-full-nbd", "dm-full", "dm from the file", "≥ 0.87x (within 15 %)")
row("full backup v1 over NBD (TCP, 4 conns)", "dm-full-nbd-tcp4", "dm-full", "dm from the file")
row("CBT incremental v2 over NBD", "dm-cbt", "restic-inc", "restic (reads all)")
base = f"inc-{sizes[0]}"
for s in sizes:
    row(f"incremental, 10 MiB changed, {s} disk (--bitmap)", f"inc-{s}", base if s != sizes[0] else "",
        f"{sizes[0]} disk" if s != sizes[0] else "", "≥ 0.5x" if s != sizes[0] else "")
row("export, nbdcopy reads all", "export-dm", "export-qemu-nbd", "qemu-nbd of the restore", "")
row("repository service (CPU: both proxies; RSS: target)", "svc-service", "svc-alone", "dm backup alone", "≥ 0.85x")
print()
sz = {t: statistics.median(float(x) for x in v[f"{t}-repo-size"]["extra"]) for t in ("dm", "restic", "borg")}
print("repository after v1 + v2: " + ", ".join(f"{t} {sz[t] / 1048576:.0f} MiB" for t in sz)
      + f" (dm / restic {sz['dm'] / sz['restic']:.2f})")
print(f"dm export peak RSS: {mib(med('export-dm-rss', 'rss'))}; "
      f"of the {sizes[-1]} disk's point: {mib(med('export-big-rss', 'rss'))} "
      f"(nbdcopy reads it in {med('export-big', 'wall'):.1f} s; dm export CPU {med('export-big-rss', 'cpu'):.1f} s)")
wire = [int(x) for x in v["svc-service"]["extra"]]
un = [tuple(int(y) for y in x.split()) for x in v["svc-unchanged"]["extra"]]
print(f"repository service: first full {statistics.median(wire) / 1048576:.0f} MiB on the wire; "
      f"unchanged second full {statistics.median(w for w, _ in un) / 1024:.1f} KiB on the wire "
      f"against a {statistics.median(s for _, s in un) / 1024:.1f} KiB manifest")
PY
