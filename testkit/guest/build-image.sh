#!/usr/bin/env bash
# Build the small Debian guest the tests boot: build-image.sh OUT
#
# OUT gets vmlinuz (Debian's cloud kernel, unpacked, not installed),
# initrd.img (busybox + the virtio modules; mounts root= and switches to
# init=), and root.qcow2: an ext4 root filesystem made by debootstrap
# (minbase + qemu-guest-agent + sqlite3) with
#   /sbin/ga-init          PID 1: mounts, then runs qemu-ga on its virtio
#                          port with the fsfreeze hook enabled (-F)
#   /etc/qemu/fsfreeze-hook.d/10-dm-load
#                          a database hook: before a freeze it logs the
#                          committed row count of the load's database
#   /etc/qemu/fsfreeze-hook.d/20-dm-fail
#                          fails the freeze while /etc/dm-fail-freeze exists
#   /usr/local/bin/dm-load a write load: SQLite transactions in a loop and a
#                          log file whose every line carries its checksum
# Needs root, debootstrap, busybox-static, qemu-utils, e2fsprogs and the
# Debian mirror. Takes about 70 s; the test kit runs it once per recipe
# (OUT/stamp holds this script's hash).
set -euo pipefail
OUT=$1
MIRROR=${MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
W=$OUT.build
rm -rf "$W"; mkdir -p "$W" "$OUT"
cd "$W"
export DEBIAN_FRONTEND=noninteractive

# 1. the kernel, unpacked from Debian's cloud kernel package
KPKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { echo "no linux-image-cloud-amd64 in apt's lists (run apt-get update)" >&2; exit 1; }
apt-get download -qq "$KPKG"
dpkg -x "$KPKG"_*.deb kroot
KV=$(ls kroot/lib/modules)

# 2. the root filesystem
debootstrap --variant=minbase --include=qemu-guest-agent,sqlite3 "$SUITE" rootfs "$MIRROR" >debootstrap.log 2>&1 \
  || { tail -20 debootstrap.log >&2; exit 1; }
chroot rootfs apt-get clean
rm -rf rootfs/var/lib/apt/lists/* rootfs/usr/share/doc/* rootfs/usr/share/man/* rootfs/usr/share/locale/*
cat >rootfs/sbin/ga-init <<'G'
#!/bin/sh
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run
mount -o remount,rw /; hostname guest
for i in $(seq 100); do for d in /sys/class/virtio-ports/*; do
  [ "$(cat $d/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${d##*/}; done
  [ -c "${port:-/x}" ] && break; sleep 0.1; done
echo "ga-init: qemu-ga on ${port:-none}, uptime $(cut -d' ' -f1 /proc/uptime)s" >/dev/console
[ -n "${port:-}" ] || exec sleep infinity
while :; do qemu-ga -m virtio-serial -p "$port" -t /run -F/etc/qemu/fsfreeze-hook; sleep 1; done
G
chmod +x rootfs/sbin/ga-init
mkdir -p rootfs/etc/qemu/fsfreeze-hook.d rootfs/var/lib/dm-load
# Debian 12's hook ignores a failing script; QEMU's newer one (as here)
# fails the freeze, which is what lets an application veto it.
cat >rootfs/etc/qemu/fsfreeze-hook <<'H'
#!/bin/sh
# Run every executable in fsfreeze-hook.d with the action (freeze|thaw),
# log to /var/log/qga-fsfreeze-hook.log, and fail when one fails.
rc=0
for s in /etc/qemu/fsfreeze-hook.d/*; do
  [ -x "$s" ] || continue
  "$s" "$@" >>/var/log/qga-fsfreeze-hook.log 2>&1 || { echo "$s $*: failed" >>/var/log/qga-fsfreeze-hook.log; rc=1; }
done
exit $rc
H
chmod +x rootfs/etc/qemu/fsfreeze-hook
cat >rootfs/etc/qemu/fsfreeze-hook.d/10-dm-load <<'H'
#!/bin/sh
# An application's hook: record what the database has committed when the
# freeze starts (a real database would flush and pause its writers here).
db=/var/lib/dm-load/load.db
[ "$1" = freeze ] && [ -e $db ] || exit 0
n=$(sqlite3 -cmd '.timeout 5000' $db 'SELECT count(*) FROM t') || exit 1
echo "$n" >/var/lib/dm-load/rows-at-freeze; sync /var/lib/dm-load/rows-at-freeze
H
cat >rootfs/etc/qemu/fsfreeze-hook.d/20-dm-fail <<'H'
#!/bin/sh
# Tests make the freeze fail by creating /etc/dm-fail-freeze.
[ "$1" = freeze ] && [ -e /etc/dm-fail-freeze ] && { echo "dm-fail: refusing to freeze" >&2; exit 1; }
exit 0
H
cat >rootfs/usr/local/bin/dm-load <<'L'
#!/bin/sh
# A write load: one SQLite transaction per row, and a log line per row that
# carries the md5 of "row N". Runs until killed.
d=/var/lib/dm-load; db=$d/load.db
sqlite3 $db 'CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)'
i=$(sqlite3 $db 'SELECT count(*) FROM t')
while :; do
  i=$((i+1))
  sqlite3 -cmd '.timeout 5000' $db "BEGIN; INSERT INTO t(id, v) VALUES($i, randomblob(2048)); COMMIT;" || exit 1
  echo "$i $(echo "row $i" | md5sum | cut -c1-32)" >>$d/log
done
L
chmod +x rootfs/etc/qemu/fsfreeze-hook.d/* rootfs/usr/local/bin/dm-load

# 3. the initramfs: busybox and the virtio modules
MODS="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console"
mkdir -p initramfs/{bin,dev,proc,sys,newroot,mod}
cp /bin/busybox initramfs/bin/
for m in $MODS; do
  f=$(find kroot/lib/modules/$KV -name "$m.ko*" | head -1)
  [ -n "$f" ] || continue
  case $f in *.xz) xz -dc "$f" >initramfs/mod/$m.ko;; *.zst) zstd -qdc "$f" >initramfs/mod/$m.ko;; *) cp "$f" initramfs/mod/;; esac
done
cat >initramfs/init <<I
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $MODS; do [ -e /mod/\$m.ko ] && insmod /mod/\$m.ko; done
root=/dev/vda; init=/sbin/init
for x in \$(cat /proc/cmdline); do case \$x in root=*) root=\${x#root=};; init=*) init=\${x#init=};; esac; done
i=0; while [ ! -b \$root ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i+1)); done
mount -t ext4 \$root /newroot || { echo "initramfs: cannot mount \$root"; exec sh; }
mount --move /dev /newroot/dev; umount /sys /proc
exec switch_root /newroot \$init
I
chmod +x initramfs/init
(cd initramfs && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 >../initrd.img)

# 4. the disk: ext4 filled from the directory (no loop mount), as qcow2
mkfs.ext4 -q -F -L root -d rootfs root.raw 1G
qemu-img convert -f raw -O qcow2 root.raw root.qcow2
cp kroot/boot/vmlinuz-* "$OUT/vmlinuz"
mv initrd.img root.qcow2 "$OUT/"
cd "$OUT"; rm -rf "$W"
