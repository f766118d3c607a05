#!/usr/bin/env bash
# Network mode (NBD) benchmark. Not part of the test run. Uses the images
# benches/compare.sh builds (v1.raw, v2.raw: 4 GiB ext4, v2 ~5 % changed);
# run that first (it needs root for the loop mount).
#
#   bash benches/nbd.sh [WORKDIR]        (default /var/tmp/dm-compare)
#
# One table, warm page cache, each time the median of REPS runs (default 3;
# this VM's timings spread by +-20 %):
#   1. plain NBD read of v1 to a null sink: dm's client vs `nbdcopy URI null:`
#      (qemu-nbd over a unix socket; also with -e 4, i.e. multi-conn);
#   2. full backup of v1 over NBD vs from the file;
#   3. CBT: v1 as a qcow2 with an enabled dirty bitmap, a full backup over
#      NBD, then the v1 -> v2 change written into it through NBD (the bitmap
#      records it), then the incremental with --bitmap; vs restic's second
#      backup of v2.raw (restic reads the whole file). The incremental is
#      restored and compared with v2.raw.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-compare}
need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 1; }; }
need qemu-nbd qemu-utils; need nbdcopy libnbd-bin; need restic restic
[ -f "$work/v2.raw" ] || { echo "no $work/v2.raw: run benches/compare.sh first" >&2; exit 1; }

cargo build --release --quiet -p datamover-cli -p datamover-benches --manifest-path "$here/Cargo.toml"
dm=$here/target/release/dm
tool=$here/target/release/nbd-tool
b=$work/nbd; rm -rf "$b"; mkdir -p "$b"; cd "$b"
v1=$work/v1.raw; v2=$work/v2.raw
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

nbd_dir=$b
source "$here/benches/lib/nbd.sh"
secs() { python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["seconds"])'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
now() { date +%s.%N; }
reps=${REPS:-3}
median() { python3 -c 'import sys,statistics; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
# med CMD...: median wall seconds of CMD, run $reps times (CMD prints nothing useful).
med() { local t v=(); for _ in $(seq "$reps"); do t=$(now); "$@" >/dev/null; v+=("$(python3 -c "print($(now) - $t)")"); done; median "${v[@]}"; }
# medjson CMD...: median of the "seconds" field CMD prints.
medjson() { local v=(); for _ in $(seq "$reps"); do v+=("$("$@" | secs)"); done; median "${v[@]}"; }
fresh_backup() { rm -rf "$1"; "$dm" init "$1" >/dev/null; "$dm" backup "$2" --repo "$1" --name vm/d --json; }
since() { python3 -c "import sys; print('%.2f' % ($(now) - $1))"; }
cat "$v1" "$v2" > /dev/null   # warm cache

declare -A r
echo "== 1. plain NBD read to null"
serve one -r -f raw "$v1"
r[dm_read]=$(medjson "$tool" read "$(uri one)")
r[nbdcopy]=$(med nbdcopy "$(uri one)" null:)
stop one
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -f "$b/tcp.pid"
qemu-nbd --fork --pid-file="$b/tcp.pid" -b 127.0.0.1 -p "$port" -x disk -t -r -f raw -e 4 "$v1"
pids+=("$(cat "$b/tcp.pid")")
tcp="nbd://127.0.0.1:$port/disk"
r[dm_read4]=$(medjson "$tool" read "$tcp")
r[nbdcopy4]=$(med nbdcopy "$tcp" null:)
stop tcp

echo "== 2. full backup over NBD vs file"
serve one -r -f raw "$v1"
r[full_file]=$(medjson fresh_backup file-repo "$v1")
r[full_nbd]=$(medjson fresh_backup nbd-repo "$(uri one)")
stop one

echo "== 3. CBT incremental vs restic"
qemu-img convert -O qcow2 "$v1" cbt.qcow2
qemu-img bitmap --add --enable cbt.qcow2 b0
"$dm" init cbt-repo >/dev/null
serve cbt -r -f qcow2 -B b0 cbt.qcow2
r[cbt_full]=$("$dm" backup "$(uri cbt)" --repo cbt-repo --name vm/d --bitmap b0 --full-if-needed --json | secs)
stop cbt
serve w -f qcow2 cbt.qcow2
changed=$("$tool" apply-diff "$v1" "$v2" "$(uri w)" | field bytes_changed)
stop w
serve cbt -r -f qcow2 -B b0 cbt.qcow2
"$dm" backup "$(uri cbt)" --repo cbt-repo --name vm/d --bitmap b0 --json > inc.json
stop cbt
r[cbt_inc]=$(secs < inc.json)
read_inc=$(field bytes_read < inc.json); dirty=$(field bytes_changed < inc.json)
"$dm" restore vm/d inc.raw --repo cbt-repo >/dev/null
cmp inc.raw "$v2" && echo "incremental restores equal to v2.raw"

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$b/restic-repo
restic init -q
cp --reflink=auto "$v1" disk.raw 2>/dev/null || cp "$v1" disk.raw
restic backup -q disk.raw >/dev/null
cp "$v2" disk.raw
t=$(now); restic backup -q disk.raw >/dev/null; r[restic_inc]=$(since "$t")

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
mib() { python3 -c "print('%.1f' % ($1 / 1048576))"; }
cat <<EOF

| measure | dm | peer | dm vs peer |
|---|---|---|---|
| NBD read to null, qemu-nbd on a unix socket (1 conn) | ${r[dm_read]} s | nbdcopy ${r[nbdcopy]} s | $(ratio "${r[nbdcopy]}" "${r[dm_read]}")x |
| NBD read to null, qemu-nbd -e 4 over TCP loopback (4 conns) | ${r[dm_read4]} s | nbdcopy ${r[nbdcopy4]} s | $(ratio "${r[nbdcopy4]}" "${r[dm_read4]}")x |
| full backup v1 | NBD ${r[full_nbd]} s | file ${r[full_file]} s | NBD/file $(ratio "${r[full_nbd]}" "${r[full_file]}") |
| full backup v1 over NBD with --bitmap | ${r[cbt_full]} s | | |
| incremental v2 | CBT ${r[cbt_inc]} s | restic ${r[restic_inc]} s | $(ratio "${r[restic_inc]}" "${r[cbt_inc]}")x |
| incremental bytes read | $(mib "$read_inc") MiB | changed $(mib "$changed") MiB (bitmap $(mib "$dirty") MiB) | $(ratio "$read_inc" "$changed") of changed |
EOF
