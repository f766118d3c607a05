#!/usr/bin/env bash
# Backups of a running real guest through QMP (issue "Real guests"), not
# part of the test run. A Debian guest (the test kit's image, built once)
# boots under QEMU (KVM with VT-x/AMD-V, else TCG) and runs its write load
# (SQLite transactions in a loop). Each round, in a new repository:
#   full        `dm backup` of its root disk, --quiesce auto
#   incremental after 10 s more of the load, --quiesce auto
# and the same pair with --quiesce off (crash-consistent) as the peer: the
# cost of quiescing is the difference. Prints medians of ROUNDS rounds
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
run() {  # run MODE ROUND KIND
  local j s r f
  j=$("$dm" backup "$spec" --name vm/root --disk vblk0 --repo "$work/repo-$1-$2" --quiesce "$1" --json)
  read -r s r f < <(python3 -c 'import json,sys; j=json.load(sys.stdin); c=j.get("consistency") or {}; print(j["seconds"], j["bytes_read"], c.get("frozen_ms", 0))' <<<"$j")
  S[$1-$3]+="$s "; R[$1-$3]+="$r "; F[$1-$3]+="$f "
}
# A disk's checkpoints follow one chain of points: each mode's full and
# incremental run back to back (a backup into another repository in
# between would start a new chain), the modes alternate.
for r in $(seq "$rounds"); do
  for mode in auto off; do
    rm -rf "$work/repo-$mode-$r"; "$dm" init "$work/repo-$mode-$r" >/dev/null
    run $mode $r full
    sleep 10
    run $mode $r incremental
  done
done
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "guest: $accel, $(qemu-img info -U --output=json "$work/vm.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"]>>20)') MiB disk, medians of $rounds rounds"
printf '%-12s %-9s %9s %14s %11s\n' run quiesce seconds "bytes read" "frozen ms"
for kind in full incremental; do for mode in auto off; do
  printf '%-12s %-9s %9s %14s %11s\n' $kind $mode "$(med "${S[$mode-$kind]}")" "$(med "${R[$mode-$kind]}")" "$(med "${F[$mode-$kind]}")"
done; done
