#!/usr/bin/env bash
# Backups of a running real guest through QMP and through libvirt (issue
# "Real guests"), not part of the test run. A Debian guest (the test kit's image, built once)
# boots under QEMU (KVM with VT-x/AMD-V, else TCG) and runs its write load
# (SQLite transactions in a loop). Each round, in a new repository:
#   full        `dm backup` of its root disk, --quiesce auto
#   incremental after 10 s more of the load, --quiesce auto
# and the same pair with --quiesce off (crash-consistent) as the peer: the
# cost of quiescing is the difference. Then the same guest image as a
# libvirt domain (libvirtd started here unless it runs), backed up through
# libvirt's pull-mode backup API, quiesced through libvirt's agent. Prints medians of ROUNDS rounds
# (interleaved): seconds, bytes read, and the time the guest was frozen.
#
#   bash benches/guest.sh [WORKDIR] [ROUNDS]   (default /var/tmp/dm-guest-bench, 3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-guest-bench}
rounds=${2:-3}
mkdir -p "$work"
cargo build --release --quiet --locked -p datamover-cli --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
img=${DM_GUEST_IMAGE:-$here/target/guest-image}
[ -e "$img/root.qcow2" ] || bash "$here/testkit/guest/build-image.sh" "$img"

accel=tcg cpu=max
if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm cpu=host; fi
pid=$work/vm.pid
cleanup() { [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; }
trap cleanup EXIT
rm -f "$work"/vm.* && cp --sparse=always "$img/root.qcow2" "$work/vm.qcow2"
qemu-system-x86_64 -accel $accel -cpu $cpu -m 512 -smp 1 -nodefaults -no-user-config -display none \
  -serial "file:$work/vm.log" -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 init=/sbin/ga-init quiet" \
  -blockdev "driver=file,node-name=file0,filename=$work/vm.qcow2" -blockdev driver=qcow2,node-name=disk0,file=file0 \
  -device virtio-blk-pci,drive=disk0,id=vblk0 -device virtio-serial-pci,id=vser0 \
  -chardev "socket,id=qga0,path=$work/vm.qga,server=on,wait=off" \
  -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
  -qmp "unix:$work/vm.qmp,server=on,wait=off" -pidfile "$pid" -daemonize
ga() {  # ga '{"execute":...}' -> the answer's "return"
  python3 - "$work/vm.qga" "$1" <<'P'
import json, socket, sys, random
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1]); f = s.makefile('rb')
i = random.randint(1, 2**31)
s.sendall(b'\xff' + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": i}}).encode() + b'\n')
def rd():
    while True:
        l = f.readline().strip().lstrip(b'\xff')
        if l: return json.loads(l)
while rd().get("return") != i: pass
s.sendall(sys.argv[2].encode() + b'\n'); print(json.dumps(rd().get("return")))
P
}
for _ in $(seq 300); do ga '{"execute":"guest-ping"}' >/dev/null 2>&1 && break; sleep 0.5; done
ga '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","dm-load >/dev/null 2>&1 &"]}}' >/dev/null
sleep 5
spec="qmp+unix://$work/vm.qmp?agent=$work/vm.qga"

declare -A S R F
run() {  # run PATH MODE ROUND KIND   (PATH: qmp or libvirt)
  local j s r f src disk
  if [ "$1" = qmp ]; then src=$spec disk=vblk0; else src=libvirt:///$dom disk=vda; fi
  j=$("$dm" backup "$src" --name vm/root --disk $disk --repo "$work/repo-$1-$2-$3" --quiesce "$2" --json)
  read -r s r f < <(python3 -c 'import json,sys; j=json.load(sys.stdin); c=j.get("consistency") or {}; print(j["seconds"], j["bytes_read"], c.get("frozen_ms", 0))' <<<"$j")
  S[$1-$2-$4]+="$s "; R[$1-$2-$4]+="$r "; F[$1-$2-$4]+="$f "
}
# A disk's checkpoints follow one chain of points: each mode's full and
# incremental run back to back (a backup into another repository in
# between would start a new chain), the modes alternate.
rounds_of() {
  for r in $(seq "$rounds"); do
    for mode in auto off; do
      rm -rf "$work/repo-$1-$mode-$r"; "$dm" init "$work/repo-$1-$mode-$r" >/dev/null
      run "$1" $mode $r full
      sleep 10
      run "$1" $mode $r incremental
    done
  done
}
rounds_of qmp
size=$(qemu-img info -U --output=json "$work/vm.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"]>>20)')
kill "$(cat "$pid")"; rm -f "$pid"; sleep 1

# The same guest as a libvirt domain.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  mkdir -p /var/log/libvirt /run/libvirt
  virtlogd -d -p "$work/virtlogd.pid"; libvirtd -d -p "$work/libvirtd.pid"; sleep 2
fi
dom=dm-bench
chmod 755 "$work"; cp --sparse=always "$img/root.qcow2" "$work/vm.qcow2"
cp "$img/vmlinuz" "$img/initrd.img" "$work/"   # where libvirt's QEMU user can read them
cat >"$work/dom.xml" <<X
<domain type='$([ $accel = kvm ] && echo kvm || echo qemu)'><name>$dom</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$work/vmlinuz</kernel><initrd>$work/initrd.img</initrd>
<cmdline>root=/dev/vda rw console=ttyS0 init=/sbin/ga-init quiet</cmdline></os><cpu mode='maximum'/>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/vm.qcow2'/><target dev='vda' bus='virtio'/></disk>
<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>
X
V() { virsh -c qemu:///system "$@"; }
V destroy $dom >/dev/null 2>&1 || true; V undefine $dom --checkpoints-metadata >/dev/null 2>&1 || true
V define "$work/dom.xml" >/dev/null; V start $dom >/dev/null
trap 'V destroy $dom >/dev/null 2>&1; V undefine $dom --checkpoints-metadata >/dev/null 2>&1; for p in libvirtd virtlogd; do [ -e "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")"; done; true' EXIT
for _ in $(seq 300); do V qemu-agent-command $dom '{"execute":"guest-ping"}' >/dev/null 2>&1 && break; sleep 0.5; done
V qemu-agent-command $dom '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","dm-load >/dev/null 2>&1 &"]}}' >/dev/null
sleep 5
rounds_of libvirt

med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "guest: $accel, $size MiB disk, medians of $rounds rounds"
printf '%-8s %-12s %-9s %9s %14s %11s\n' path run quiesce seconds "bytes read" "frozen ms"
for path in qmp libvirt; do for kind in full incremental; do for mode in auto off; do
  printf '%-8s %-12s %-9s %9s %14s %11s\n' $path $kind $mode "$(med "${S[$path-$mode-$kind]}")" "$(med "${R[$path-$mode-$kind]}")" "$(med "${F[$path-$mode-$kind]}")"
done; done; done
