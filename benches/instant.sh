#!/usr/bin/env bash
# Instant VM recovery (issue "Instant VM recovery"), not part of the test
# run. Each round, a real guest (the test kit's image: a 1 GiB root disk,
# and a 2 GiB data disk with 1 GiB written) is backed up by `dm backup
# --all-disks` and powered off (the lost VM); then, from the same points:
#   instant    `dm instant-recover` (a new domain on NBD exports of the
#              points, writes to overlays): command to the guest's agent
#              answering
#   restore    the peer: `dm vm-restore` (every disk restored whole, then
#              the domain defined and started): command to the agent
#   migrate    the instantly recovered VM moved to production images
#              while it runs (`dm instant-recover --migrate`): seconds in
#              all, and the pause of the switch (downtime)
# Prints medians of ROUNDS rounds. Guests run under TCG here (no VT-x).
#
#   bash benches/instant.sh [WORKDIR] [ROUNDS]   (default /var/tmp/dm-instant-bench, 3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-instant-bench}
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
if [ "$(stat -c %g /dev/kvm 2>/dev/null)" = 0 ]; then chgrp kvm /dev/kvm && chmod 660 /dev/kvm; fi
cp "$img/vmlinuz" "$img/initrd.img" "$work/"
V() { virsh -c qemu:///system "$@"; }
dom=dm-ib
gone() { for d in $dom $dom-i $dom-r; do V destroy $d >/dev/null 2>&1 || true; V undefine $d --checkpoints-metadata >/dev/null 2>&1 || true; done; }
trap 'gone; [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null; for p in libvirtd virtlogd; do [ -e "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")"; done; true' EXIT
ga() { V qemu-agent-command "$1" "$2"; }
up() { for _ in $(seq 1200); do ga "$1" '{"execute":"guest-ping"}' >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
sh_in() {
  local p
  p=$(ga "$1" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$2\"]}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["pid"])')
  for _ in $(seq 1200); do
    ga "$1" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$p}}" | grep -q '"exited":true' && return 0
    sleep 0.2
  done
}
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 2))"; }
field() { python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"; }

declare -A M
for r in $(seq "$rounds"); do
  gone
  rm -rf "$work/r" && mkdir -p "$work/r" && chmod 755 "$work/r"
  cp --sparse=always "$img/root.qcow2" "$work/r/vm.qcow2"
  qemu-img create -q -f qcow2 "$work/r/data.qcow2" 2G
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
  sh_in $dom 'dd if=/dev/urandom of=/dev/vdb bs=1M count=1024 status=none; sync'
  "$dm" init "$work/r/repo" >/dev/null
  "$dm" backup libvirt:///$dom --all-disks --name app --repo "$work/r/repo" >/dev/null
  V destroy $dom >/dev/null
  # Instant recovery: serving in the background until migrated.
  t=$(now)
  "$dm" instant-recover app --repo "$work/r/repo" --on libvirt:///$dom-i --dir "$work/r/sessions" >/dev/null 2>"$work/r/ir.log" &
  srv=$!
  up $dom-i; M[ir]+="$(since "$t") "
  sh_in $dom-i 'dd if=/dev/urandom of=/root/new bs=1M count=16 status=none; sync'
  t=$(now)
  j=$("$dm" instant-recover --session $dom-i --migrate "$work/r/prod" --dir "$work/r/sessions" --json 2>/dev/null)
  M[mig]+="$(since "$t") "; M[down]+="$(field 'j["downtime_ms"]' <<<"$j") "
  wait "$srv"; srv=
  V destroy $dom-i >/dev/null; V undefine $dom-i >/dev/null
  # The peer: restore every disk whole, then boot.
  t=$(now)
  "$dm" vm-restore app --name $dom-r --repo "$work/r/repo" --to "$work/r/restored" >/dev/null
  up $dom-r; M[full]+="$(since "$t") "
  V destroy $dom-r >/dev/null; V undefine $dom-r >/dev/null
done
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "guest: tcg, 1 GiB root + 2 GiB data disk (1 GiB written), medians of $rounds rounds"
printf '%-36s %9s\n' run seconds
printf '%-36s %9s\n' "instant recovery, to the agent" "$(med "${M[ir]}")"
printf '%-36s %9s\n' "full restore + boot, to the agent" "$(med "${M[full]}")"
printf '%-36s %9s   (pause %s ms)\n' "migration of the recovered VM" "$(med "${M[mig]}")" "$(med "${M[down]}")"
