# Sourced by benches/nbd.sh and benches/all.sh: qemu-nbd exports on unix
# sockets in $nbd_dir; processes started are added to the caller's pids.
#
#   serve NAME ARGS...   qemu-nbd ARGS (after -x disk -t) on $nbd_dir/NAME.sock
#   stop NAME            stops it and waits until it is gone
#   uri NAME             its NBD URI
serve() {
  local name=$1; shift
  rm -f "$nbd_dir/$name.sock" "$nbd_dir/$name.pid"
  qemu-nbd --fork --pid-file="$nbd_dir/$name.pid" -k "$nbd_dir/$name.sock" -x disk -t "$@"
  pids+=("$(cat "$nbd_dir/$name.pid")")
}
stop() { local p; p=$(cat "$nbd_dir/$1.pid"); kill "$p"; while [ -e "/proc/$p" ]; do sleep 0.05; done; }
uri() { echo "nbd+unix:///disk?socket=$nbd_dir/$1.sock"; }
