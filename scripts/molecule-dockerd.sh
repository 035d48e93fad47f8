#!/usr/bin/env bash
# A private dockerd for Molecule and the demo: its own data-root, exec-root, socket and
# pidfile, its own mount namespace, no bridge and no iptables (several dockerds share this
# host), storage overlay2 on a plain directory. Nothing else on the machine is touched.
#
#   bash scripts/molecule-dockerd.sh start    # starts it (or reuses a running one)
#   bash scripts/molecule-dockerd.sh env      # prints: export DOCKER_HOST=unix://...
#   bash scripts/molecule-dockerd.sh stop     # stops the one this script started
#   bash scripts/molecule-dockerd.sh status
#
# MOLECULE_DOCKERD_DIR (default /var/tmp/molecule-dockerd) holds everything; it must not
# be on overlayfs.
set -euo pipefail

DIR=${MOLECULE_DOCKERD_DIR:-/var/tmp/molecule-dockerd}
SOCK=$DIR/docker.sock
PIDFILE=$DIR/dockerd.pid
LOG=$DIR/dockerd.log
export DOCKER_HOST=unix://$SOCK

running() {
  [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && docker version >/dev/null 2>&1
}

start() {
  if running; then
    echo "molecule-dockerd: running (pid $(cat "$PIDFILE"), $DOCKER_HOST)"
    return 0
  fi
  mkdir -p "$DIR/root" "$DIR/exec"
  case $(stat -f -c %T "$DIR") in
    overlayfs) echo "molecule-dockerd: $DIR is on overlayfs; set MOLECULE_DOCKERD_DIR" >&2; exit 1 ;;
  esac
  if [[ -f $PIDFILE ]] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    rm -f "$PIDFILE"   # left by a dockerd that died
  fi
  echo "molecule-dockerd: starting dockerd ($DOCKER_HOST, log $LOG)"
  # setsid: its own session, so it outlives this script and stops only by its pid.
  # unshare: its own mount namespace with an empty /run/docker/plugins. dockerd scans
  # that host-wide directory for volume plugins whenever a container gets a volume, and
  # a stale socket left there by someone else's test would hang it.
  # The namespace drops its copies of CernVM-FS mounts (a stratum 0's repositories, test
  # client mounts): where / is not a shared mount (no systemd as PID 1) the host's later
  # unmounts would not reach them, and a copy of a stratum 0's FUSE mount keeps its old
  # cvmfs2 alive: the repository's next remount (every publish) would hang on its lock.
  mkdir -p /run/docker/plugins
  # shellcheck disable=SC2016  # the awk program is for the inner sh, as written
  setsid unshare --mount --propagation slave sh -c \
    'awk '"'"'$5 ~ /^\/(var\/spool\/cvmfs|cvmfs|var\/tmp\/cgd-cvmfs-)/ {print $5}'"'"' /proc/self/mountinfo \
       | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
     mount -t tmpfs -o mode=0755,size=1m molecule-dockerd-plugins /run/docker/plugins && exec "$0" "$@"' \
    dockerd --data-root "$DIR/root" --exec-root "$DIR/exec" -H "$DOCKER_HOST" \
    --pidfile "$PIDFILE" --storage-driver overlay2 \
    --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
    </dev/null >>"$LOG" 2>&1 &
  for _ in $(seq 1 120); do
    if docker version >/dev/null 2>&1; then
      echo "molecule-dockerd: up (pid $(cat "$PIDFILE"))"
      return 0
    fi
    sleep 0.5
  done
  echo "molecule-dockerd: dockerd did not come up; last log lines:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
}

stop() {
  if [[ ! -f $PIDFILE ]]; then
    echo "molecule-dockerd: not running"
    return 0
  fi
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    echo "molecule-dockerd: stopping pid $pid"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "molecule-dockerd: pid $pid still alive after 30 s; killing it" >&2
      kill -KILL "$pid"
    fi
  fi
  rm -f "$PIDFILE"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
  status) if running; then echo "running (pid $(cat "$PIDFILE"))"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
