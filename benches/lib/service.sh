# Sourced by benches/server.sh and benches/all.sh: a server and two proxies
# on loopback, for backups through the repository service.
#
#   service_up WORK DISK     needs $bin (the release binaries); defines
#                            src_pid, tgt_pid, DM_SERVER, DM_TOKEN, DM_CA,
#                            the repositories "shared" (WORK/shared) and
#                            "vault" (WORK/vault, behind the target proxy's
#                            repository service) and the jobs "viashared"
#                            and "viaservice" backing up DISK (bench/vda)
#                            on the source proxy.
#   run_job JOB              runs JOB and prints "task_seconds wall_seconds
#                            wire_bytes bytes_stored".
#   cpu PID                  CPU seconds (user + system) PID has used.
# Processes started are added to the caller's pids array.

api() { curl -sf --cacert "$DM_CA" -H "Authorization: Bearer $DM_TOKEN" "$DM_SERVER/api/v1/$1"; }
cpu() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }

service_up() {
  local work=$1 disk=$2 s=$1/server
  rm -rf "$s" "$work/p-src" "$work/p-tgt" "$work/vault" "$work/shared"
  "$bin/dm-server" --data "$s" --listen 127.0.0.1:0 --no-builtin-proxy --heartbeat-ms 500 \
    2> "$work/server.log" & pids+=($!)
  for _ in $(seq 100); do [ -f "$s/server.url" ] && break; sleep 0.1; done
  DM_SERVER=$(cat "$s/server.url") DM_TOKEN=$(cat "$s/admin.token") DM_CA=$s/ca/ca.pem
  export DM_SERVER DM_TOKEN DM_CA
  # Each host has an address of its own (127.0.0.1 is the server's).
  # Hosts are proxies by role; the source's datastore holds the disk.
  token() { "$bin/dm" host add "$@" --role proxy --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["enrollment_token"])'; }
  "$bin/dm-proxy" --dir "$work/p-src" run --server "$DM_SERVER" \
    --token "$(token src --address 127.0.0.2 --datastore "$(dirname "$disk")")" \
    --datastore "$(dirname "$disk")" --repo-listen off 2> "$work/src.log" & pids+=($!); src_pid=$!
  "$bin/dm-proxy" --dir "$work/p-tgt" run --server "$DM_SERVER" --token "$(token tgt --address 127.0.0.3)" \
    --repo-listen 127.0.0.3:0 2> "$work/tgt.log" & pids+=($!); tgt_pid=$!
  for _ in $(seq 100); do
    [ "$(api proxies | python3 -c 'import json,sys; print(sum(p["state"]=="online" for p in json.load(sys.stdin)))')" = 2 ] && break
    sleep 0.2
  done
  "$bin/dm" repo add shared "$work/shared" >/dev/null
  "$bin/dm" repo add vault "$work/vault" --proxy tgt >/dev/null
  "$bin/dm" job create viashared --repo shared --disk "bench/vda=$disk" --proxy src --retries 0 >/dev/null
  "$bin/dm" job create viaservice --repo vault --disk "bench/vda=$disk" --proxy src --retries 0 >/dev/null
}

run_job() {
  local t0 t1
  t0=$(date +%s.%N)
  "$bin/dm" job run "$1" --wait > /dev/null
  t1=$(date +%s.%N)
  api "sessions?limit=1" | python3 -c '
import json, sys
from datetime import datetime
t = json.load(sys.stdin)[0]["tasks"][0]
assert t["state"] == "success", t
d = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
task = d(t["finished"]) - d(t["started"])
wall = float(sys.argv[2]) - float(sys.argv[1])
print("%.2f %.2f %d %d" % (task, wall, t.get("wire_bytes") or 0, t["bytes_stored"]))' "$t0" "$t1"
}
