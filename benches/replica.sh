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
mkdir -p "$work" && chmod 755 "$work"
cargo build --release --quiet --locked -p datamover-cli --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
img=${DM_GUEST_IMAGE:-$here/target/guest-image}
[ -e "$img/root.qcow2" ] || bash "$here/testkit/guest/build-image.sh" "$img"
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  mkdir -p /var/log/libvirt /run/libvirt
  virtlogd -d -p "$work/virtlogd.pid"; libvirtd -d -p "$work/libvirtd.pid"; sleep 2
fi
# Debian's udev owner for /dev/kvm (see testkit's Libvirtd): otherwise
# libvirt re-probes QEMU at every define here.
if [ "$(stat -c %g /dev/kvm 2>/dev/null)" = 0 ]; then chgrp kvm /dev/kvm && chmod 660 /dev/kvm; fi
cp "$img/vmlinuz" "$img/initrd.img" "$work/"
V() { virsh -c qemu:///system "$@"; }
dom=dm-rb
gone() { for d in $dom $dom-t; do V destroy $d >/dev/null 2>&1 || true; V undefine $d --checkpoints-metadata >/dev/null 2>&1 || true; done; }
trap 'gone; for p in libvirtd virtlogd; do [ -e "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")"; done; true' EXIT
ga() { V qemu-agent-command "$1" "$2"; }
sh_in() {  # sh_in DOMAIN 'command': run and wait
  local p
  p=$(ga "$1" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$2\"]}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["pid"])')
  for _ in $(seq 600); do
    ga "$1" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$p}}" | grep -q '"exited":true' && return 0
    sleep 0.2
  done
}
up() { for _ in $(seq 300); do ga "$1" '{"execute":"guest-ping"}' >/dev/null 2>&1 && return 0; sleep 0.5; done; return 1; }
field() { python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"; }

declare -A M
for r in $(seq "$rounds"); do
  gone
  rm -rf "$work/r" && mkdir -p "$work/r" && chmod 755 "$work/r"
  cp --sparse=always "$img/root.qcow2" "$work/r/vm.qcow2"
  qemu-img create -q -f qcow2 "$work/r/data.qcow2" 256M
  cat >"$work/r/dom.xml" <<X
<domain type='qemu'><name>$dom</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$work/vmlinuz</kernel><initrd>$work/initrd.img</initrd>
<cmdline>root=/dev/vda rw console=ttyS0 init=/sbin/ga-init quiet</cmdline></os><cpu mode='maximum'/>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/r/vm.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/r/data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>
X
  V define "$work/r/dom.xml" >/dev/null; V start $dom >/dev/null; up $dom
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

med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "guest: tcg, 1 GiB + 256 MiB disks, medians of $rounds rounds"
printf '%-10s %9s %14s %16s\n' run seconds "downtime s" "bytes moved"
printf '%-10s %9s %14s %16s\n' migrate "$(med "${M[mig-s]}")" "$(med "${M[mig-d]}")" "$(med "${M[mig-b]}")"
printf '%-10s %9s %14s %16s\n' failback "$(med "${M[fb-s]}")" "$(med "${M[fb-d]}")" "$(med "${M[fb-b]}")"
printf '%-10s %9s %14s %16s\n' convert "$(med "${M[rs-s]}")" "$(med "${M[rs-s]}")" "$(med "${M[rs-b]}")"
