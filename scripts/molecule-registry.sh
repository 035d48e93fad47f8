#!/usr/bin/env bash
# A throwaway Docker registry (Debian's docker-registry) on 127.0.0.1 for Molecule
# scenarios: the nodes share the host's network, and Docker treats loopback registries as
# insecure, so they push and pull over plain HTTP with no set-up. Its access log is what
# the lazy-pull checks read.
#
#   bash scripts/molecule-registry.sh start DIR   # prints HOST:PORT; DIR holds data, log, pid
#   bash scripts/molecule-registry.sh stop DIR
set -euo pipefail
cmd=${1:?usage: molecule-registry.sh start|stop DIR}
dir=${2:?usage: molecule-registry.sh start|stop DIR}

case $cmd in
  start)
    command -v docker-registry >/dev/null || { echo "molecule-registry: docker-registry missing (scripts/setup.sh installs it)" >&2; exit 1; }
    mkdir -p "$dir/data"
    if [[ -f $dir/pid ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      cat "$dir/address"
      exit 0
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$dir/config.yml" <<CONFIG
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$port
CONFIG
    setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    echo "127.0.0.1:$port" >"$dir/address"
    for _ in $(seq 100); do
      if python3 -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $port)))"; then
        echo "127.0.0.1:$port"
        exit 0
      fi
      sleep 0.1
    done
    echo "molecule-registry: no registry on 127.0.0.1:$port; its log:" >&2
    tail -n 20 "$dir/registry.log" >&2
    exit 1
    ;;
  stop)
    if [[ -f $dir/pid ]]; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      rm -f "$dir/pid"
    fi
    ;;
  *) echo "molecule-registry: unknown command $cmd" >&2; exit 2 ;;
esac
