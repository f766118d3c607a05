#!/usr/bin/env bash
# File-level restore (issue "Instant VM recovery"), not part of the test
# run. One 300 MiB incompressible file (/data/random1.bin) out of a point
# of the 4 GiB comparison image (benches/comparison-image.sh), medians of
# ROUNDS rounds, page cache warm:
#   dm ls      `dm files vm/disk ls /data`: command to first listing, the
#              appliance's start-up included
#   dm get     `dm files vm/disk get /data/random1.bin --to DIR`: command
#              to the file written (start-up included), and the bytes read
#              from the repository (target: at most 2x the file + 16 MiB)
#   guestfish  the peer: libguestfs straight on the raw image file
#              (`guestfish --ro -a v1.raw -m /dev/sda download ...`)
#   loop+cp    the physical anchor: loop mount in this host's kernel and cp
#              (what dm never does with a guest's filesystem)
#
#   bash benches/files.sh [WORKDIR] [ROUNDS]   (default /var/tmp/dm-compare, 3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-compare}
rounds=${2:-3}
cargo build --release --quiet --locked -p datamover-cli --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
bash "$here/benches/comparison-image.sh" "$work"
cd "$work"
export LIBGUESTFS_BACKEND=direct
if ! { [ -w /dev/kvm ] && grep -qE 'vmx|svm' /proc/cpuinfo; }; then
  export LIBGUESTFS_BACKEND_SETTINGS=force_tcg; accel=tcg
else accel=kvm; fi
rm -rf files-repo && "$dm" init files-repo >/dev/null
"$dm" backup v1.raw --repo files-repo --name vm/disk >/dev/null
file=/data/random1.bin
fsize=$(guestfish --ro -a v1.raw -m /dev/sda filesize $file)
mnt=$work/files-mnt; mkdir -p "$mnt"
cleanup() { mountpoint -q "$mnt" && umount "$mnt"; [ -n "${lo:-}" ] && losetup -d "$lo" 2>/dev/null; true; }
trap cleanup EXIT
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 2))"; }
declare -A M
for r in $(seq "$rounds"); do
  cat v1.raw files-repo/packs/*/* >/dev/null 2>&1 || true
  t=$(now); "$dm" files vm/disk ls /data --repo files-repo >/dev/null; M[ls]+="$(since "$t") "
  rm -rf out && mkdir out
  t=$(now); err=$("$dm" files vm/disk get $file --to out --repo files-repo 2>&1 >/dev/null); M[get]+="$(since "$t") "
  M[read]+="$(sed -n 's/.*; \([0-9]*\) bytes read from the repository.*/\1/p' <<<"$err") "
  rm -rf gf && mkdir gf
  t=$(now); guestfish --ro -a v1.raw -m /dev/sda download $file gf/f; M[gf]+="$(since "$t") "
  cmp -s out/random1.bin gf/f || { echo "dm's copy differs from guestfish's" >&2; exit 1; }
  rm -rf lc && mkdir lc
  t=$(now); lo=$(losetup -r -f --show v1.raw); mount -o ro "$lo" "$mnt"; cp "$mnt$file" lc/f
  umount "$mnt"; losetup -d "$lo"; lo=; M[loop]+="$(since "$t") "
  cmp -s out/random1.bin lc/f || { echo "dm's copy differs from the loop mount's" >&2; exit 1; }
done
med() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
read_b=$(med "${M[read]}")
echo "appliance: $accel; file $file: $fsize bytes; medians of $rounds rounds"
printf '%-28s %9s %22s\n' run seconds "bytes read from repo"
printf '%-28s %9s %22s\n' "dm files ls /data" "$(med "${M[ls]}")" "-"
printf '%-28s %9s %22s\n' "dm files get (to a dir)" "$(med "${M[get]}")" "$read_b"
printf '%-28s %9s %22s\n' "guestfish download (raw)" "$(med "${M[gf]}")" "-"
printf '%-28s %9s %22s\n' "loop mount + cp (host)" "$(med "${M[loop]}")" "-"
python3 -c "r=$read_b; f=$fsize; print(f'bytes read / file size: {r/f:.2f} (target: at most 2x the file + 16 MiB = {2*f + (16<<20)}: {\"met\" if r <= 2*f + (16<<20) else \"missed\"})')"
