#!/usr/bin/env bash
# VMs on replicas (issue "Real guests"), not part of the test run. Each
# round, a real guest (the test kit's image, a 1 GiB root disk and a
# 256 MiB data disk half written) runs its write load as a libvirt domain
# (libvirtd started here unless it runs), then:
#   migrate    `dm migrate` to a new domain on its replicas: seconds in
#              all, seconds paused (downtime), bytes of the final sync
#   failback   the guest writes 64 MiB on the target, then `dm replica
#              failback` to the original: seconds, downtime, bytes written
#              to the original disks
#   convert    the peer of failback: what one does by hand, `qemu-img
#              convert -n` of each replica image into the original disk
#              (every disk written whole; the original is off)
# Prints medians of ROUNDS rounds.
#
#   bash benches/replica.sh [WORKDIR] [ROUNDS]   (default /var/tmp/dm-replica-bench, 3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-replica-bench}
rounds=${2:-3}
dom=dm-rb
doms="$dom $dom-t"
source "$here/benches/libvirt-guest.sh"

declare -A M
for r in $(seq "$rounds"); do
  fresh_guest 256M
  sh_in $dom 'dd if=/dev/urandom of=/dev/vdb bs=1M count=128 status=none; sync'
  ga $dom '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","dm-load >/dev/null 2>&1 &"]}}' >/dev/null
  sleep 5
  "$dm" init "$work/r/repo" >/dev/null
  j=$("$dm" migrate libvirt:///$dom --to libvirt:///$dom-t --repo "$work/r/repo" --replicas "$work/r/replicas" --json)
  M[mig-s]+="$(field 'j["seconds"]' <<<"$j") "; M[mig-d]+="$(field 'j["downtime_seconds"]' <<<"$j") "
  M[mig-b]+="$(field 'j["final_sync_bytes"]' <<<"$j") "
  up $dom-t
  sh_in $dom-t 'dd if=/dev/urandom of=/root/after bs=1M count=64 status=none; sync'
  j=$("$dm" replica failback $dom --on libvirt:///$dom-t --to libvirt:///$dom --repo "$work/r/repo" --replicas "$work/r/replicas" --no-start --json)
  M[fb-s]+="$(field 'j["seconds"]' <<<"$j") "; M[fb-d]+="$(field 'j["downtime_seconds"]' <<<"$j") "
  M[fb-b]+="$(field 'sum(d["bytes_written"] for d in j["disks"])' <<<"$j") "
  size=$(field 'sum(d["disk_size"] for d in j["disks"])' <<<"$j")
  t0=$(date +%s.%N)
  qemu-img convert -n -f raw -O qcow2 "$work/r/replicas/$dom/vda.img" "$work/r/vm.qcow2"
  qemu-img convert -n -f raw -O qcow2 "$work/r/replicas/$dom/vdb.img" "$work/r/data.qcow2"
  M[rs-s]+="$(python3 -c "print(round($(date +%s.%N) - $t0, 2))") "; M[rs-b]+="$size "
done

echo "guest: tcg, 1 GiB + 256 MiB disks, medians of $rounds rounds"
printf '%-10s %9s %14s %16s\n' run seconds "downtime s" "bytes moved"
printf '%-10s %9s %14s %16s\n' migrate "$(med "${M[mig-s]}")" "$(med "${M[mig-d]}")" "$(med "${M[mig-b]}")"
printf '%-10s %9s %14s %16s\n' failback "$(med "${M[fb-s]}")" "$(med "${M[fb-d]}")" "$(med "${M[fb-b]}")"
printf '%-10s %9s %14s %16s\n' convert "$(med "${M[rs-s]}")" "$(med "${M[rs-s]}")" "$(med "${M[rs-b]}")"
