#!/usr/bin/env bash
# Instant VM recovery (issue "Instant VM recovery"), not part of the test
# run. Each round, a real guest (the test kit's image: a 1 GiB root disk,
# and a 2 GiB data disk with 1 GiB written) is backed up by `dm backup
# --all-disks` and powered off (the lost VM); then, from the same points:
#   instant    `dm instant-recover` (a new domain on NBD exports of the
#              points, writes to overlays): command to the guest's agent
#              answering
#   restore    the peer: `dm vm-restore` (every disk restored whole, then
#              the domain defined and started): command to the agent
#   migrate    the instantly recovered VM moved to production images
#              while it runs (`dm instant-recover --migrate`): seconds in
#              all, and the pause of the switch (downtime)
# Prints medians of ROUNDS rounds. Guests run under TCG here (no VT-x).
#
#   bash benches/instant.sh [WORKDIR] [ROUNDS]   (default /var/tmp/dm-instant-bench, 3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/var/tmp/dm-instant-bench}
rounds=${2:-3}
dom=dm-ib
doms="$dom $dom-i $dom-r"
source "$here/benches/libvirt-guest.sh"
trap 'gone; [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null; for p in libvirtd virtlogd; do [ -e "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")"; done; true' EXIT

declare -A M
for r in $(seq "$rounds"); do
  fresh_guest 2G
  sh_in $dom 'dd if=/dev/urandom of=/dev/vdb bs=1M count=1024 status=none; sync'
  "$dm" init "$work/r/repo" >/dev/null
  "$dm" backup libvirt:///$dom --all-disks --name app --repo "$work/r/repo" >/dev/null
  V destroy $dom >/dev/null
  # Instant recovery: serving in the background until migrated.
  t=$(now)
  "$dm" instant-recover app --repo "$work/r/repo" --on libvirt:///$dom-i --dir "$work/r/sessions" >/dev/null 2>"$work/r/ir.log" &
  srv=$!
  up $dom-i; M[ir]+="$(since "$t") "
  sh_in $dom-i 'dd if=/dev/urandom of=/root/new bs=1M count=16 status=none; sync'
  t=$(now)
  j=$("$dm" instant-recover --session $dom-i --migrate "$work/r/prod" --dir "$work/r/sessions" --json 2>/dev/null)
  M[mig]+="$(since "$t") "; M[down]+="$(field 'j["downtime_ms"]' <<<"$j") "
  wait "$srv"; srv=
  V destroy $dom-i >/dev/null; V undefine $dom-i >/dev/null
  # The peer: restore every disk whole, then boot.
  t=$(now)
  "$dm" vm-restore app --name $dom-r --repo "$work/r/repo" --to "$work/r/restored" >/dev/null
  up $dom-r; M[full]+="$(since "$t") "
  V destroy $dom-r >/dev/null; V undefine $dom-r >/dev/null
done
echo "guest: tcg, 1 GiB root + 2 GiB data disk (1 GiB written), medians of $rounds rounds"
printf '%-36s %9s\n' run seconds
printf '%-36s %9s\n' "instant recovery, to the agent" "$(med "${M[ir]}")"
printf '%-36s %9s\n' "full restore + boot, to the agent" "$(med "${M[full]}")"
printf '%-36s %9s   (pause %s ms)\n' "migration of the recovered VM" "$(med "${M[mig]}")" "$(med "${M[down]}")"
