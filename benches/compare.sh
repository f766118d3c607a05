#!/usr/bin/env bash
# Side-by-side comparison of dm with restic and borg (Debian's packages) on a
# realistic VM disk image. Not part of the test run. Needs root (loop mount).
#
#   bash benches/compare.sh [WORKDIR]        (default /var/tmp/dm-compare)
#
# Builds a 4 GiB raw image holding an ext4 filesystem with an OS tree (/usr),
# incompressible files, duplicated files, a text log and a file of zeros;
# then a second version with about 5 % of the disk changed. For each tool:
# back up v1, back up v2, restore v2 to a file, cmp it with v2. Prints a table
# of wall seconds, MB/s of logical size, CPU seconds, peak RSS, repository
# size, and dm's speed-up over each peer. Page cache is warm (images are read
# once before each run) so that tools are compared on their own work; set
# COLD=1 to drop caches before every timed step instead.
#
# Settings, all tools at their defaults except: restic needs a password
# (it always encrypts; dm and borg here do not), borg uses -e none.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-compare}
size=${SIZE:-4G}
need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }; }
need restic restic; need borg borgbackup; need mkfs.ext4 e2fsprogs; need /usr/bin/time time
[ "$(id -u)" = 0 ] || { echo "run as root (loop mounts)" >&2; exit 1; }

cargo build --release --quiet -p datamover-cli --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
mkdir -p "$work"; cd "$work"
bash "$here/benches/comparison-image.sh" "$work"
logical=$(stat -c %s v1.raw)
echo "v1: $(du -h v1.raw | cut -f1) allocated of $((logical >> 20)) MiB"

warm() { if [ "${COLD:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; else cat "$@" > /dev/null; fi; }
results=$work/results.tsv; : > "$results"
# run TOOL PHASE REPO CMD...: time CMD, record secs, cpu, rss, repo size.
# From a settled disk: the previous run's writeback is flushed first (as
# in all.sh), so no tool pays for another's writes.
run() {
  local tool=$1 phase=$2 repo=$3; shift 3
  sync
  /usr/bin/time -f "%e %U %S %M" -o time.out "$@" > "$tool-$phase.log" 2>&1 || { echo "$tool $phase failed:"; tail -5 "$tool-$phase.log"; exit 1; }
  read -r secs user sys rss < <(tail -1 time.out)
  printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$tool" "$phase" "$secs" "$(echo "$user + $sys" | bc)" "$((rss / 1024))" "$(du -sb "$repo" | cut -f1)" >> "$results"
}

mkdir -p cur
rm -rf dm-repo dmf-repo restic-repo borg-repo restore-*
export RESTIC_PASSWORD=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

echo "== dm"
$dm init dm-repo > /dev/null
warm v1.raw; run dm backup-v1 dm-repo $dm backup v1.raw --repo dm-repo --name vm/disk
warm v2.raw; run dm backup-v2 dm-repo $dm backup v2.raw --repo dm-repo --name vm/disk
run dm restore-v2 dm-repo $dm restore vm/disk restore-dm.raw --repo dm-repo
cmp v2.raw restore-dm.raw && echo "dm restore == v2"

echo "== dm --chunking cdc (for the choice of the default chunker)"
$dm init dmf-repo > /dev/null
warm v1.raw; run dm-cdc backup-v1 dmf-repo $dm backup v1.raw --repo dmf-repo --name vm/disk --chunking cdc
warm v2.raw; run dm-cdc backup-v2 dmf-repo $dm backup v2.raw --repo dmf-repo --name vm/disk --chunking cdc
run dm-cdc restore-v2 dmf-repo $dm restore vm/disk restore-dmf.raw --repo dmf-repo
cmp v2.raw restore-dmf.raw && echo "dm-cdc restore == v2"
rm -f restore-dmf.raw

echo "== restic $(restic version | cut -d' ' -f2)"
restic init -q --repo restic-repo
ln -f v1.raw cur/disk.raw; warm cur/disk.raw; run restic backup-v1 restic-repo restic -q --repo restic-repo backup cur/disk.raw
ln -f v2.raw cur/disk.raw; warm cur/disk.raw; run restic backup-v2 restic-repo restic -q --repo restic-repo backup cur/disk.raw
run restic restore-v2 restic-repo restic -q --repo restic-repo restore latest --target restore-restic
cmp v2.raw restore-restic/cur/disk.raw && echo "restic restore == v2"

echo "== borg $(borg --version | cut -d' ' -f2)"
borg init -e none borg-repo
ln -f v1.raw cur/disk.raw; warm cur/disk.raw; run borg backup-v1 borg-repo borg create borg-repo::v1 cur/disk.raw
ln -f v2.raw cur/disk.raw; warm cur/disk.raw; run borg backup-v2 borg-repo borg create borg-repo::v2 cur/disk.raw
mkdir -p restore-borg
run borg restore-v2 borg-repo sh -c "cd restore-borg && borg extract --sparse ../borg-repo::v2"
cmp v2.raw restore-borg/cur/disk.raw && echo "borg restore == v2"

echo
echo "logical size $((logical >> 20)) MiB; MB/s = logical bytes / wall seconds / 10^6"
awk -F'\t' -v L="$logical" '
  { k=$1" "$2; secs[k]=$3; cpu[k]=$4; rss[k]=$5; repo[k]=$6; tools[$1]=1; phases[$2]=1 }
  END {
    printf "| %-8s | %-10s | %8s | %8s | %8s | %9s | %10s | %9s | %9s |\n", "tool", "phase", "seconds", "MB/s", "CPU s", "peak RSS", "repo MiB", "dm / restic", "dm / borg"
    printf "|----------|------------|----------|----------|----------|-----------|------------|-----------|-----------|\n"
    n = split("dm dm-cdc restic borg", T, " "); m = split("backup-v1 backup-v2 restore-v2", P, " ")
    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) {
      k = T[i]" "P[j]; if (!(k in secs)) continue
      r1 = (T[i] ~ /^dm/) ? sprintf("%.2fx", secs["restic "P[j]] / secs[k]) : ""
      r2 = (T[i] ~ /^dm/) ? sprintf("%.2fx", secs["borg "P[j]] / secs[k]) : ""
      printf "| %-8s | %-10s | %8.2f | %8.0f | %8.2f | %6d MiB | %10.0f | %9s | %9s |\n", T[i], P[j], secs[k], L / secs[k] / 1e6, cpu[k], rss[k], repo[k] / 1048576, r1, r2
    }
  }' "$results"
echo "(repo MiB: repository size after that step; dm / peer: the peer's seconds over dm's, >1 means dm is faster.)"
