#!/usr/bin/env bash
# Server quickstart: start dm-server (SQLite catalog, its own CA, built-in
# proxy), add a repository and a backup job of two demo disks through the
# REST API with `dm --server`, run it twice with live progress, restore a
# point and check every byte, then stop the server.
# Usage: bash examples/server-quickstart.sh [WORKDIR]   (default: ./server-quickstart-work)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-server-quickstart-work}
cargo build --release --quiet -p datamover-cli -p datamover-server -p datamover-proxy
bin=$PWD/target/release
rm -rf "$work" && mkdir -p "$work" && work=$(cd "$work" && pwd) && cd "$work"

echo "== two 256 MiB demo disks in images/, the built-in proxy's datastore"
mkdir images
for d in vda vdb; do
  truncate -s 256M images/$d.raw
  head -c 96M /dev/urandom | dd of=images/$d.raw bs=1M seek=16 conv=notrunc status=none
done

echo "== dm-server: catalog, CA and admin token in $work/server"
# The built-in proxy reads and writes only under the datastores given here.
"$bin/dm-server" --data server --listen 127.0.0.1:0 --datastore "$work/images" >server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s server/server.url ] && break; sleep 0.1; done
export DM_SERVER=$(cat server/server.url) DM_TOKEN_FILE=server/admin.token DM_CA=server/ca/ca.pem
dm=$bin/dm

echo "== inventory and a job (the built-in proxy moves the data: no proxy added)"
for _ in $(seq 100); do $dm proxy list | grep -q online && break; sleep 0.1; done
$dm proxy list
$dm repo add main "$work/repo"
$dm job create nightly --repo main --disk web01/vda="$work/images/vda.raw" --disk web01/vdb="$work/images/vdb.raw"

echo "== run it twice (the second run stores nothing new)"
$dm job run nightly --wait
$dm job run nightly --wait
$dm session list

echo "== restore the newest point of web01/vda and compare byte for byte"
$dm restore web01/vda restored.raw --repo repo
cmp images/vda.raw restored.raw && echo "restore is identical to the disk"
$dm verify --repo repo
