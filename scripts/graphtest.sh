#!/usr/bin/env bash
# moby's graph-driver conformance suite (daemon/graphdriver/graphtest of moby 20.10, from
# Debian's golang-github-docker-docker-dev) against cvmfs-graphdriver, reached as dockerd
# reaches a legacy plugin (pkg/plugins discovery of /run/docker/plugins/NAME.sock and
# daemon/graphdriver/proxy.go). The Go side is conformance/gopath/src/cvmfsconformance/graphtest.
#
#   bash scripts/graphtest.sh          # the tests of overlay2's test file; a failure,
#                                      # a skip or a mount left behind fails the run
#   bash scripts/graphtest.sh --bench  # the benchmarks, plugin vs built-in overlay2 in the
#                                      # same binary: bench/graphtest.json, bench/RESULTS.md
#
# Needs root (overlay mounts) and .venv (scripts/setup.sh). Starts its own daemon on a
# socket of its own, with the default configuration; layer homes live under a temporary
# directory (on /var/tmp, or $CVMFS_GRAPHTEST_WORKDIR) that is unmounted and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="test"
case "${1:-}" in
  "") ;;
  --bench) mode=bench ;;
  *) echo "usage: $0 [--bench]" >&2; exit 2 ;;
esac
if [[ $EUID -ne 0 ]]; then
  echo "graphtest: needs root (the driver mounts overlays)" >&2
  exit 1
fi

if [[ ! -x .venv/bin/cvmfs-graphdriver ]]; then
  echo "graphtest: no .venv/bin/cvmfs-graphdriver; run scripts/setup.sh first" >&2
  exit 1
fi

source scripts/go-env.sh
bin=$GO_BIN_DIR/cvmfs-graphtest.test
# Go's build cache makes this about half a second when nothing changed (~20 s cold).
go test -c -o "$bin" cvmfsconformance/graphtest

name=cvmfs-graphtest-$$
sock=/run/docker/plugins/$name.sock
work=$(mktemp -d "${CVMFS_GRAPHTEST_WORKDIR:-/var/tmp}/cvmfs-graphtest.XXXXXX")
mkdir -p /run/docker/plugins "$work/tmp"
daemon_pid=

mounts_under() {  # mount points below $1, deepest first
  awk -v p="$1/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

cleanup() {
  local rc=$? m state
  if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid"
    for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" || true
  fi
  for m in $(mounts_under "$work"); do
    umount "$m" || umount -l "$m" || true
  done
  if [[ -z $(mounts_under "$work") ]]; then
    rm -rf --one-file-system "$work"
  else
    echo "graphtest: mounts remain under $work, not removing it" >&2
  fi
  rm -f "$sock"
  # The daemon records its Init in a state file named after its socket (cli.state_file).
  if state=$(.venv/bin/python -c 'import sys; from cvmfs_graphdriver.cli import state_file
print(state_file(sys.argv[1]))' "$sock"); then
    rm -f "$state"
  fi
  exit "$rc"
}
trap cleanup EXIT

fail() {
  echo "graphtest: FAILED: $*" >&2
  echo "---- daemon log (last 40 lines) ----" >&2
  tail -n 40 "$work/daemon.log" >&2
  exit 1
}

# An empty configuration file: every default, whatever /etc/cvmfs-graphdriver holds.
: >"$work/config.ini"
.venv/bin/cvmfs-graphdriver serve --config "$work/config.ini" --socket "$sock" \
  >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
  [[ -S $sock ]] && break
  kill -0 "$daemon_pid" 2>/dev/null || fail "the daemon exited before listening"
  sleep 0.1
done
[[ -S $sock ]] || fail "no socket at $sock after 10 s"

export TMPDIR=$work/tmp CVMFS_GRAPHTEST_PLUGIN=$name CVMFS_GRAPHTEST_SOCKET=$sock

if [[ $mode == test ]]; then
  expected=$("$bin" -test.list '^Test' | grep -c '^Test' || true)
  set +e
  "$bin" -test.v -test.count=1 -test.timeout=10m 2>&1 | tee "$work/test.log"
  rc=${PIPESTATUS[0]}
  set -e
  passed=$(grep -c -- '^--- PASS: ' "$work/test.log" || true)
  failed=$(grep -c -- '^--- FAIL: ' "$work/test.log" || true)
  skipped=$(grep -c -- '^--- SKIP: ' "$work/test.log" || true)
  echo "graphtest: $passed passed, $failed failed, $skipped skipped"
  ((rc == 0)) || fail "go test exited with $rc"
  ((skipped == 0)) || fail "skipped tests count as failures: $(grep -- '^--- SKIP: ' "$work/test.log" | tr '\n' ' ')"
  ((expected > 0 && passed == expected)) || fail "$passed of $expected tests passed"
  # Teardown called the driver's Cleanup: nothing may stay mounted.
  left=$(mounts_under "$work")
  [[ -z $left ]] || fail "mounts left after Cleanup: $left"
  exit 0
fi

# Benchmarks: each BenchmarkX runs driver=cvmfs, then driver=overlay2; the whole list runs
# three times (rounds, so that both drivers see the same drift) and the report takes the
# median. 3.5 to 6 minutes here (2 CPUs), depending on what else runs; the 10K-file
# benchmarks are most of it.
benchtime=300ms rounds=3
: >"$work/bench.log"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)  # others' work on the machine skews figures
rc=0
set +e
for round in $(seq "$rounds"); do
  echo "== graphtest benchmarks, round $round of $rounds"
  "$bin" -test.run '^$' -test.bench . -test.benchtime "$benchtime" -test.timeout 20m 2>&1 |
    tee -a "$work/bench.log"
  ((PIPESTATUS[0] == 0)) || rc=1
done
set -e

# What was measured: the commit, whether driver/ differs from it, and the code imported.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain -- driver 2>/dev/null) ]] || commit+=" with uncommitted driver/ changes"
GT_BENCHTIME=$benchtime GT_ROUNDS=$rounds GT_COMMIT=$commit GT_LOAD_BEFORE=$load_before \
GT_GO=$(go version) \
GT_MOBY=$(dpkg-query -W -f='${Version}' golang-github-docker-docker-dev) \
GT_DRIVER=$(.venv/bin/cvmfs-graphdriver --version) \
GT_DRIVER_SRC=$(.venv/bin/python -c 'import os, cvmfs_graphdriver as m; print(os.path.dirname(m.__file__))') \
  python3 - "$work/bench.log" bench/graphtest.json bench/RESULTS.md <<'EOF'
"""Turns `go test -bench` output into bench/graphtest.json and a RESULTS.md section."""
import datetime, json, os, platform, re, statistics, sys

log, out_json, results_md = sys.argv[1:4]
HEADER = "## moby graphtest benchmarks (plugin vs built-in overlay2)"
DRIVERS = ("cvmfs", "overlay2")
result = re.compile(r"^Benchmark(\w+)/driver=(\w+)(?:-\d+)?\s+(\d+)\s+([\d.]+) ns/op")
failure = re.compile(r"^\s*--- FAIL: Benchmark(\w+)/driver=(\w+)")

runs, errors, order = {}, {}, []
lines = open(log, encoding="utf-8", errors="replace").read().splitlines()
for i, line in enumerate(lines):
    if m := result.match(line):
        bench, drv, n, ns = m.group(1), m.group(2), int(m.group(3)), float(m.group(4))
        runs.setdefault((bench, drv), []).append({"iterations": n, "ns_per_op": ns})
    elif m := failure.match(line):
        bench, drv = m.group(1), m.group(2)
        detail = lines[i + 1].strip() if i + 1 < len(lines) else ""
        errors.setdefault((bench, drv), detail)
    else:
        continue
    if bench not in order:
        order.append(bench)

def cpu():
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()

def mem_gib():
    for line in open("/proc/meminfo", encoding="utf-8"):
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)

benchmarks = []
for bench in order:
    entry = {"name": bench}
    for drv in DRIVERS:
        r = runs.get((bench, drv), [])
        entry[drv] = {
            "runs": r,
            "median_ns_per_op": statistics.median(x["ns_per_op"] for x in r) if r else None,
            "error": errors.get((bench, drv)),
        }
    a, b = entry["cvmfs"]["median_ns_per_op"], entry["overlay2"]["median_ns_per_op"]
    entry["ratio_cvmfs_over_overlay2"] = round(a / b, 2) if a and b else None
    benchmarks.append(entry)

now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
doc = {
    "date": now.isoformat(),
    "command": "bash scripts/graphtest.sh --bench",
    "benchtime": os.environ["GT_BENCHTIME"], "rounds": int(os.environ["GT_ROUNDS"]),
    "machine": {"cpu": cpu(), "cpus": os.cpu_count(), "memory_gib": mem_gib(),
                "kernel": platform.release(), "os": platform.freedesktop_os_release().get(
                    "PRETTY_NAME", ""),
                "loadavg_before": os.environ["GT_LOAD_BEFORE"],
                "loadavg_after": " ".join(open("/proc/loadavg").read().split()[:3])},
    "versions": {"go": os.environ["GT_GO"], "moby_graphtest": os.environ["GT_MOBY"],
                 "cvmfs_graphdriver": os.environ["GT_DRIVER"], "commit": os.environ["GT_COMMIT"],
                 "driver_source": os.environ["GT_DRIVER_SRC"]},
    "benchmarks": benchmarks,
}
with open(out_json, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")

def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"

def cell(e):
    if e["error"]:
        return "FAILED (below)"
    return fmt(e["median_ns_per_op"]) if e["median_ns_per_op"] else "no result"

def ratio(r):
    return "—" if r is None else f"{r:.2f}" if r < 10 else f"{r:.0f}"

m = doc["machine"]
section = [
    HEADER, "",
    f"moby 20.10's `graphtest` benchmarks (the list of overlay2's `overlay_test.go`), per "
    f"operation, median of {doc['rounds']} rounds at `-benchtime {doc['benchtime']}`; "
    f"our plugin through moby's plugin client (HTTP over its unix socket) and the built-in "
    f"overlay2 (run as dockerd runs it: untar in a re-executed chrooted child) in the same "
    f"test binary. `bash scripts/graphtest.sh --bench`; raw figures in "
    f"[graphtest.json](graphtest.json).",
    "",
    f"{now:%Y-%m-%d}, {m['cpus']} × {m['cpu']}, {m['memory_gib']} GiB, kernel {m['kernel']} "
    f"(load average {m['loadavg_before']} before, {m['loadavg_after']} after), "
    f"{doc['versions']['cvmfs_graphdriver']} ({doc['versions']['commit']}), moby "
    f"{doc['versions']['moby_graphtest']}, {doc['versions']['go'].replace('go version ', '')}.",
    "",
    "| benchmark | cvmfs plugin | overlay2 | cvmfs / overlay2 |",
    "| --- | ---: | ---: | ---: |",
]
for e in benchmarks:
    r = e["ratio_cvmfs_over_overlay2"]
    section.append(f"| {e['name']} | {cell(e['cvmfs'])} | {cell(e['overlay2'])} | {ratio(r)} |")
section += [
    "",
    "Exists and GetEmpty are one plugin round trip (HTTP into the Python daemon) against an "
    "in-process Go call; Read20Layers reads through the kernel's overlay mount and does not "
    "involve the driver.",
    "",
]
for e in benchmarks:
    for drv in DRIVERS:
        if e[drv]["error"]:
            section += [f"{e['name']} failed for {drv}:", "", f"    {e[drv]['error']}", ""]

text = open(results_md, encoding="utf-8").read() if os.path.exists(results_md) else ""
lines = text.splitlines()
if HEADER in lines:  # replace our section, up to the next level-2 heading
    start = lines.index(HEADER)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    lines[start:end] = section
else:
    lines += ([""] if lines and lines[-1] else []) + section
with open(results_md, "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n")
print(f"graphtest: wrote {out_json} and the graphtest section of {results_md}")
EOF
if ((rc != 0)); then
  echo "graphtest: FAILED: some benchmarks failed; see above" >&2
  exit 1
fi
