#!/usr/bin/env bash
# Same work, two revisions of `dm`, one run: a refactoring must not cost
# speed or memory. Not part of the test run.
#
#   bash benches/revs.sh OLD_REV [NEW_REV] [ROUNDS] [WORKDIR]
#
# NEW_REV defaults to the working tree (HEAD with uncommitted changes),
# ROUNDS to 3, WORKDIR to /var/tmp/dm-revs. Each revision's `dm` is built
# in release mode in a git worktree (sharing this checkout's target
# directory for the dependencies). The image: 1 GiB, 384 MiB random,
# 256 MiB text, 384 MiB hole. Rounds are interleaved (old, new, old, new
# ...); each round backs up into a fresh repository (full), backs up again
# (unchanged: all chunks known), restores and compares the restore byte for
# byte. Prints medians of wall seconds and peak RSS (MiB) per step.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=${1:?usage: bash benches/revs.sh OLD_REV [NEW_REV] [ROUNDS] [WORKDIR]}
new=${2:-WORKTREE}
rounds=${3:-3}
work=${4:-/var/tmp/dm-revs}
target=${CARGO_TARGET_DIR:-$here/target}
mkdir -p "$work"

build() { # rev -> path of its dm
  local rev=$1 out=$work/dm-$1
  if [ "$rev" = WORKTREE ]; then
    cargo build --release --quiet -p datamover-cli --manifest-path "$here/Cargo.toml"
    cp "$target/release/dm" "$out"
  else
    local wt=$work/src-$rev
    [ -d "$wt" ] || git -C "$here" worktree add -q --detach "$wt" "$rev"
    CARGO_TARGET_DIR=$target cargo build --release --quiet -p datamover-cli --manifest-path "$wt/Cargo.toml"
    cp "$target/release/dm" "$out"
  fi
  echo "$out"
}
dm_old=$(build "$old")
dm_new=$(build "$new")

img=$work/disk.raw
if [ ! -f "$img" ]; then
  truncate -s 1G "$img"
  head -c 384M /dev/urandom | dd of="$img" conv=notrunc status=none
  # `yes` ends on SIGPIPE when head has enough: not a failure.
  { yes "2026-11-30 INFO vm started, disk attached, backup window open" || true; } | head -c 256M |
    dd of="$img" bs=1M seek=384 conv=notrunc status=none
fi
want=$(sha256sum < "$img")

measure() { # label step dm args... -> "label step seconds rss_mib"
  local label=$1 step=$2 dm=$3; shift 3
  /usr/bin/time -f "%e %M" -o "$work/time.txt" "$dm" "$@" >/dev/null 2>&1
  echo "$label $step $(awk '{printf "%s %.0f", $1, $2 / 1024}' "$work/time.txt")"
}

results=$work/results.txt
: > "$results"
for r in $(seq "$rounds"); do
  for side in old new; do
    dm=$dm_old; [ $side = new ] && dm=$dm_new
    repo=$work/repo-$side; out=$work/out-$side.raw
    rm -rf "$repo" "$out"
    "$dm" init "$repo" >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    measure $side full "$dm" backup "$img" --repo "$repo" --name vm/vda >> "$results"
    measure $side unchanged "$dm" backup "$img" --repo "$repo" --name vm/vda >> "$results"
    measure $side restore "$dm" restore vm/vda "$out" --repo "$repo" >> "$results"
    [ "$(sha256sum < "$out")" = "$want" ] || { echo "round $r $side: restore differs" >&2; exit 1; }
  done
done

echo "dm $old (old) vs ${new} (new): medians of $rounds interleaved rounds, 1 GiB image"
printf '| step | old s | new s | new/old | old RSS MiB | new RSS MiB |\n|---|---|---|---|---|---|\n'
for step in full unchanged restore; do
  med() { grep "^$1 $step " "$results" | awk -v c="$2" '{print $c}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  os=$(med old 3); ns=$(med new 3); orss=$(med old 4); nrss=$(med new 4)
  printf '| %s | %s | %s | %.2f | %s | %s |\n' "$step" "$os" "$ns" "$(echo "$ns $os" | awk '{print ($2 > 0) ? $1 / $2 : 0}')" "$orss" "$nrss"
done
