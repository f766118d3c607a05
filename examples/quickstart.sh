#!/usr/bin/env bash
# Quickstart: build dm, make a demo disk image, back it up twice into a local
# repository, change 5 % of it, back up again, restore, and check every byte.
# Usage: bash examples/quickstart.sh [WORKDIR]   (default: ./quickstart-work)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-quickstart-work}
cargo build --release --quiet -p datamover-cli
dm=$PWD/target/release/dm
rm -rf "$work" && mkdir -p "$work" && cd "$work"

echo "== a 1 GiB sparse disk image: 200 MiB random, 100 MiB of logs, holes"
truncate -s 1G disk.raw
put() { dd of=disk.raw bs=1M seek="$1" conv=notrunc iflag=fullblock status=none; }
head -c 200M /dev/urandom | put 64
(set +o pipefail; yes "Nov 25 09:52:35 web01 nginx: GET /index.html 200" | head -c 100M | put 512)

echo "== dm init / backup / backup again (unchanged: nothing new is stored)"
$dm init repo
$dm backup disk.raw --repo repo --name web01/vda
$dm backup disk.raw --repo repo --name web01/vda

echo "== change 5 % of the disk and back up (only changed chunks are stored)"
head -c 50M /dev/urandom | put 100
$dm backup disk.raw --repo repo --name web01/vda --json
$dm points --repo repo

echo "== restore the newest point and compare byte for byte"
$dm restore web01/vda restored.raw --repo repo
cmp disk.raw restored.raw && echo "restore is identical to the disk"
$dm verify --repo repo --read-data
$dm prune --repo repo --keep-last 2
du -sh --apparent-size disk.raw; du -sh repo
