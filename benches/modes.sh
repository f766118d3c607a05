#!/usr/bin/env bash
# Transport modes benchmark: full and incremental backup of the same running
# VM disk through each mode, side by side in one run. Not part of the test
# run. Needs root (loop device, XFS mount) and the images benches/compare.sh
# builds (v1.raw, v2.raw: 4 GiB ext4, v2 ~5 % changed): run that first.
#
#   sudo bash benches/modes.sh [WORKDIR]        (default /var/tmp/dm-compare)
#
# The "VM" is qemu-storage-daemon with the disk as raw and as qcow2, both on
# XFS (reflink=1) on a loop device, QMP on a unix socket. For every
# (format, mode): a fresh repository, a full backup (wall time: freeze,
# read, commit), then the v1 <-> v2 change written by the "guest" through
# the VM's writable NBD export (the checkpoint bitmap records it), then the
# incremental. Each incremental is restored and compared with the disk.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-compare}
need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }; }
need qemu-storage-daemon qemu-utils; need mkfs.xfs xfsprogs
[ -f "$work/v2.raw" ] || { echo "no $work/v2.raw: run benches/compare.sh first" >&2; exit 1; }

cargo build --release --quiet -p datamover-cli -p datamover-benches --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
tool=$here/target/release/nbd-tool
b=$work/modes; mnt=$b/xfs
dev=
cleanup() {
  [ -f "$b/qsd.pid" ] && kill "$(cat "$b/qsd.pid")" 2>/dev/null && sleep 0.5
  mountpoint -q "$mnt" && umount "$mnt"
  [ -n "$dev" ] && losetup -d "$dev"
  true
}
trap cleanup EXIT
rm -rf "$b"; mkdir -p "$mnt"
truncate -s 12G "$b/xfs.img"; mkfs.xfs -q -m reflink=1 "$b/xfs.img"
dev=$(losetup -f --show "$b/xfs.img"); mount "$dev" "$mnt"
v1=$work/v1.raw; v2=$work/v2.raw
cp --sparse=always "$v1" "$mnt/r.raw"
qemu-img convert -f raw -O qcow2 "$v1" "$mnt/q.qcow2"
sync

qemu-storage-daemon \
  --chardev socket,path="$b/qmp.sock",server=on,wait=off,id=m0 --monitor chardev=m0 \
  --blockdev driver=file,filename="$mnt/r.raw",node-name=rf --blockdev driver=raw,file=rf,node-name=r \
  --blockdev driver=file,filename="$mnt/q.qcow2",node-name=qf --blockdev driver=qcow2,file=qf,node-name=q \
  --nbd-server addr.type=unix,addr.path="$b/live.sock" \
  --export type=nbd,id=guest-r,node-name=r,name=r,writable=on \
  --export type=nbd,id=guest-q,node-name=q,name=q,writable=on \
  --pidfile "$b/qsd.pid" --daemonize
vm="qmp+unix://$b/qmp.sock?nbd-server=$b/live.sock"
now() { date +%s.%N; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
declare -A state=([r]=v1 [q]=v1)

printf '%-8s %-28s %9s %9s %12s %12s\n' disk mode full_s incr_s incr_read changed
for row in "r san" "r hotadd" "r nbd" "r storage-snapshot:reflink" \
           "q hotadd" "q nbd" "q storage-snapshot:reflink" "q storage-snapshot:qcow2-internal"; do
  set -- $row; disk=$1; mode=${2%%:*}; prov=${2#*:}; [ "$prov" = "$2" ] && prov=auto
  repo=$b/repo; rm -rf "$repo"; "$dm" init "$repo" >/dev/null
  run() { "$dm" backup "$vm" --disk "$disk" --repo "$repo" --name vm/$disk \
            --transport "$mode" --snapshot-provider "$prov" --json; }
  t=$(now); run > "$b/full.json"; full=$(python3 -c "print('%.2f' % ($(now) - $t))")
  [ "$(field transport < "$b/full.json")" = "$mode" ] || { echo "mode not used: $(cat "$b/full.json")" >&2; exit 1; }
  if [ "${state[$disk]}" = v1 ]; then from=$v1 to=$v2 next=v2; else from=$v2 to=$v1 next=v1; fi
  changed=$("$tool" apply-diff "$from" "$to" "nbd+unix:///$disk?socket=$b/live.sock" | field bytes_changed)
  state[$disk]=$next
  t=$(now); run > "$b/inc.json"; inc=$(python3 -c "print('%.2f' % ($(now) - $t))")
  [ "$(field incremental < "$b/inc.json")" = True ] || { echo "not incremental: $(cat "$b/inc.json")" >&2; exit 1; }
  rm -f "$b/out.raw"; "$dm" restore vm/$disk "$b/out.raw" --repo "$repo" >/dev/null
  cmp -s "$b/out.raw" "$to" || { echo "restore of $disk via $mode differs from $next" >&2; exit 1; }
  printf '%-8s %-28s %9s %9s %12s %12s\n' "$disk" "$2" "$full" "$inc" \
    "$(( $(field bytes_read < "$b/inc.json") >> 20 )) MiB" "$(( changed >> 20 )) MiB"
done
rm -rf "$b/repo" "$b/out.raw"
