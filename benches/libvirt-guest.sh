# Sourced by the benchmarks that run a real guest as a libvirt domain
# (replica.sh, instant.sh): set `here`, `work` and `doms` (the domains to
# remove on exit) first. Builds dm (release) and the test kit's guest
# image, starts libvirtd unless it runs, and defines:
#   dm            the dm binary
#   img           the guest image directory (vmlinuz, initrd.img, root.qcow2)
#   V ARGS        virsh on qemu:///system
#   gone          destroy and undefine every domain in $doms
#   ga DOM JSON   a guest-agent command
#   sh_in DOM CMD run CMD in the guest and wait for it
#   up DOM        wait until the guest's agent answers
#   now, since T  wall clock, and seconds since T
#   field EXPR    a Python expression over JSON on stdin (`j`)
#   med VALUES    the median of space-separated numbers
#   fresh_guest S a new guest $dom with an S data disk (below)
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
gone() { for d in $doms; do V destroy "$d" >/dev/null 2>&1 || true; V undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || true; done; }
trap 'gone; for p in libvirtd virtlogd; do [ -e "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")"; done; true' EXIT
ga() { V qemu-agent-command "$1" "$2"; }
sh_in() {
  local p
  p=$(ga "$1" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$2\"]}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["pid"])')
  for _ in $(seq 1200); do
    ga "$1" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$p}}" | grep -q '"exited":true' && return 0
    sleep 0.2
  done
}
up() { for _ in $(seq 1200); do ga "$1" '{"execute":"guest-ping"}' >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 2))"; }
field() { python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"; }
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# fresh_guest DATA_SIZE: remove the domains, then define and start $dom in
# a new $work/r (root disk: a copy of the image; a new DATA_SIZE data disk
# as vdb), and wait for its agent.
fresh_guest() {
  gone
  rm -rf "$work/r" && mkdir -p "$work/r" && chmod 755 "$work/r"
  cp --sparse=always "$img/root.qcow2" "$work/r/vm.qcow2"
  qemu-img create -q -f qcow2 "$work/r/data.qcow2" "$1"
  cat >"$work/r/dom.xml" <<X
<domain type='qemu'><name>$dom</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$work/vmlinuz</kernel><initrd>$work/initrd.img</initrd>
<cmdline>root=/dev/vda rw console=ttyS0 init=/sbin/ga-init quiet</cmdline></os><cpu mode='maximum'/>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/r/vm.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/r/data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>
X
  V define "$work/r/dom.xml" >/dev/null; V start "$dom" >/dev/null; up "$dom"
}
