#!/usr/bin/env bash
# The comparison image of the benchmarks (compare.sh, files.sh): a raw
# disk of SIZE (default 4G) holding an ext4 filesystem with an OS tree
# (/usr), incompressible files (/data/random1.bin, random2.bin: 300 MiB
# each), duplicated files, a text log and a file of zeros (v1.raw); and a
# second version with about 5 % of the disk changed (v2.raw). Built once
# in WORKDIR; needs root (loop mount).
#
#   bash benches/comparison-image.sh WORKDIR
set -euo pipefail
work=$1
size=${SIZE:-4G}
[ "$(id -u)" = 0 ] || { echo "run as root (loop mounts)" >&2; exit 1; }
mkdir -p "$work"; cd "$work"
mnt=$work/mnt; mkdir -p "$mnt"

cleanup() { mountpoint -q "$mnt" && umount "$mnt"; [ -n "${lo:-}" ] && losetup -d "$lo" 2>/dev/null; true; }
trap cleanup EXIT

fill_random() { head -c "$2" /dev/urandom > "$1"; }
fill_log() {
  python3 - "$1" "$2" <<'PY'
import random, sys
path, n = sys.argv[1], int(sys.argv[2])
r = random.Random(int(n))
hosts = ["web01", "web02", "db01", "cache03"]; svc = ["nginx", "sshd", "kernel", "postgres", "cron"]
paths = ["/index.html", "/api/v1/items", "/login", "/static/app.js", "/health"]
with open(path, "a") as f:
    w = 0
    while w < n:
        line = "Nov 25 %02d:%02d:%02d %s %s[%d]: %s %s %d %dms user=%d\n" % (
            r.randrange(24), r.randrange(60), r.randrange(60), r.choice(hosts), r.choice(svc),
            r.randrange(1, 65535), r.choice(["GET", "POST", "PUT"]), r.choice(paths),
            r.choice([200, 200, 200, 304, 404, 500]), r.randrange(1, 900), r.randrange(10000))
        f.write(line); w += len(line)
PY
}

if [ ! -f v2.raw ]; then
  echo "== building v1.raw ($size, ext4)"
  rm -f v1.raw; truncate -s "$size" v1.raw
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 v1.raw
  lo=$(losetup -f --show v1.raw); mount "$lo" "$mnt"
  mkdir -p "$mnt/usr" "$mnt/data" "$mnt/var/log"
  cp -a /usr/share /usr/bin /usr/include /usr/libexec "$mnt/usr/" 2>/dev/null || true
  fill_random "$mnt/data/random1.bin" 300M
  fill_random "$mnt/data/random2.bin" 300M
  fill_random "$mnt/data/dup.bin" 200M
  cp "$mnt/data/dup.bin" "$mnt/data/dup-copy1.bin"; cp "$mnt/data/dup.bin" "$mnt/data/dup-copy2.bin"
  fill_log "$mnt/var/log/syslog" $((300 << 20))
  head -c 300M /dev/zero > "$mnt/data/zeros.bin"
  sync; umount "$mnt"; losetup -d "$lo"; lo=
  echo "== building v2.raw (~5 % changed)"
  cp --sparse=always v1.raw v2.raw
  lo=$(losetup -f --show v2.raw); mount "$lo" "$mnt"
  head -c 100M /dev/urandom | dd of="$mnt/data/random1.bin" bs=1M seek=100 conv=notrunc iflag=fullblock status=none
  fill_log "$mnt/var/log/syslog" $((50 << 20))
  fill_random "$mnt/data/new.bin" 50M
  sync; umount "$mnt"; losetup -d "$lo"; lo=
fi
