#!/usr/bin/env bash
# The one place that decides where CernVM-FS comes from on a machine of this project's
# (tests, benchmarks, demo), installs it, and runs a local stratum 0 and client mounts.
#
#   cvmfs.sh source                  print the source: repository | files | none
#   cvmfs.sh debs                    print the directory of the package files
#   cvmfs.sh install [client|all]    install CVMFS from that source (idempotent)
#   cvmfs.sh stratum0 REPO...        a stratum 0 on 127.0.0.1 with these repositories
#   cvmfs.sh mount REPO DIR CACHE    a real client mount of a local repository at DIR
#                                    (CVMFS_STRATUM0_URL=http://HOST/cvmfs/@fqrn@ reads it
#                                    from elsewhere, e.g. through a shaped link)
#   cvmfs.sh remount DIR CACHE       make the client at DIR see the latest revision
#   cvmfs.sh umount DIR
#
# The source, in order (CVMFS_SOURCE=repository|files|none overrides):
#   repository  CERN's package repository, when it answers (what production nodes use);
#   files       the .deb files in CVMFS_DEBS (default ../shared/cvmfs from the project
#               root: packages built from upstream sources for Debian 12, for tests here);
#   none        neither: tests fall back to a local directory standing in for a repository,
#               and this script says so loudly. Under CI=true, `install` then fails.
#
# The roles do the same for worker nodes (cvmfs_client_package_source); this script is
# for the machine the project's own tests and benchmarks run on.
set -euo pipefail
cd "$(dirname "$0")/.."

CERN_APT_URL=https://cvmrepo.s3.cern.ch/cvmrepo/apt
CERN_APT_KEY_URL=$CERN_APT_URL/cernvm.gpg
# ../shared/cvmfs from the project root; a clone elsewhere on these machines finds it at
# /work/shared/cvmfs.
if [[ -z ${CVMFS_DEBS:-} ]]; then
  for CVMFS_DEBS in "$(cd .. && pwd)/shared/cvmfs" /work/shared/cvmfs; do
    [[ -d $CVMFS_DEBS ]] && break
  done
fi
# What the packages need beside their Depends: the server calls modprobe (kmod), serves
# through apache2, and its scripts use attr, lsof, psmisc, rsync, jq, sqlite3, curl.
SERVER_EXTRAS=(apache2 kmod attr psmisc lsof rsync jq sqlite3 curl gawk)

say() { echo "cvmfs.sh: $*" >&2; }
loud() {
  local line="=========================================================================="
  printf '%s\n%s\n%s\n' "$line" "cvmfs.sh: $*" "$line" >&2
}

reachable() {  # URL: does it answer within 5 s? (python3: curl may not be installed yet)
  python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=5).close()
except Exception:
    sys.exit(1)
EOF
}

source_of_cvmfs() {
  if [[ -n ${CVMFS_SOURCE:-} ]]; then
    case $CVMFS_SOURCE in
      repository | files | none) echo "$CVMFS_SOURCE"; return ;;
      *) say "CVMFS_SOURCE=$CVMFS_SOURCE: use repository, files or none"; exit 2 ;;
    esac
  fi
  if reachable "$CERN_APT_KEY_URL"; then
    echo repository
  elif compgen -G "$CVMFS_DEBS/cvmfs_*.deb" >/dev/null; then
    echo files
  else
    echo none
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_cvmfs() {
  local what=${1:-all} src
  src=$(source_of_cvmfs)
  local want=(cvmfs)
  [[ $what == all ]] && want+=(cvmfs-server)
  local missing=()
  for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
  if ((${#missing[@]} == 0)); then
    say "CernVM-FS $(cvmfs2 --version 2>&1 | grep -o '[0-9][0-9.]*' | head -1) already installed"
  else
    case $src in
      repository)
        say "installing ${missing[*]} from CERN's repository $CERN_APT_URL"
        apt_install ca-certificates curl
        curl -fsSL -o /usr/share/keyrings/cernvm.gpg "$CERN_APT_KEY_URL"
        # shellcheck disable=SC1091
        echo "deb [signed-by=/usr/share/keyrings/cernvm.gpg] $CERN_APT_URL \
$(. /etc/os-release && echo "$VERSION_CODENAME")-prod main" >/etc/apt/sources.list.d/cernvm.list
        apt-get update -qq
        apt_install "${missing[@]}" cvmfs-config-default
        ;;
      files)
        say "installing ${missing[*]} from the package files in $CVMFS_DEBS (CERN's repository is unreachable)"
        apt-get update -qq
        local debs=("$CVMFS_DEBS"/cvmfs-config-none_*.deb "$CVMFS_DEBS"/cvmfs-libs_*.deb
          "$CVMFS_DEBS"/cvmfs_*.deb "$CVMFS_DEBS"/cvmfs-fuse3_*.deb)
        [[ $what == all ]] && debs+=("$CVMFS_DEBS"/cvmfs-server_*.deb)
        apt_install fuse3 "${debs[@]}"
        ;;
      none)
        loud "NO REAL CERNVM-FS: CERN's repository is unreachable and there are no package
files in $CVMFS_DEBS. Tests use a local directory standing in for each repository;
nothing is measured or checked on a real CVMFS client or stratum 0."
        [[ ${CI:-} == true ]] && { say "CI=true: a real CVMFS is required"; exit 1; }
        return 0
        ;;
    esac
  fi
  if [[ $what == all ]] && ! { installed apache2 && installed kmod; }; then
    apt_install "${SERVER_EXTRAS[@]}"
  fi
  # user cvmfs, /var/lib/cvmfs; no autofs here: mounts are made explicitly.
  cvmfs_config setup noautofs
  host_quirks
}

host_quirks() {
  # The client drops to user cvmfs before opening /dev/fuse; distributions ship it 0666,
  # some VMs 0600.
  [[ $(stat -c %a /dev/fuse) == 666 ]] || { say "chmod 0666 /dev/fuse (was $(stat -c %a /dev/fuse))"; chmod 0666 /dev/fuse; }
  # Without systemd as PID 1, cvmfs_server and cvmfs_suid_helper still call systemctl
  # whenever /bin/systemctl exists, and fail. Divert it so they use service(8) and mount(8).
  if [[ -e /bin/systemctl && ! -d /run/systemd/system ]] \
    && ! dpkg-divert --list /bin/systemctl | grep -q cvmfs-nosystemd; then
    say "systemd is not PID 1: diverting /bin/systemctl away (cvmfs_server would call it)"
    dpkg-divert --local --rename --divert /bin/systemctl.cvmfs-nosystemd --add /bin/systemctl >/dev/null
  fi
}

nfiles_setting() {
  # The client raises its open-files limit to CVMFS_NFILES (default 131072); where the
  # hard limit is lower and CAP_SYS_RESOURCE is missing, that fails.
  local hard
  hard=$(ulimit -Hn)
  if [[ $hard != unlimited ]] && ((hard < 131072)); then
    echo "CVMFS_NFILES=$((hard > 16384 ? 16384 : hard))"
  fi
}

start_apache() {
  sed -i 's/^Listen 80$/Listen 127.0.0.1:80/' /etc/apache2/ports.conf
  grep -q '^ServerName' /etc/apache2/apache2.conf || echo 'ServerName 127.0.0.1' >>/etc/apache2/apache2.conf
  if ! reachable http://127.0.0.1/; then
    if [[ -d /run/systemd/system ]]; then systemctl start apache2; else service apache2 start >/dev/null; fi
  fi
  reachable http://127.0.0.1/ || { say "apache2 does not answer on 127.0.0.1:80"; exit 1; }
}

in_transaction() { [[ -e /var/spool/cvmfs/$1/in_transaction.lock || -e /var/spool/cvmfs/$1/in_transaction ]]; }

stratum0() {
  command -v cvmfs_server >/dev/null || { say "cvmfs_server is not installed: run '$0 install' first"; exit 1; }
  start_apache
  local repo
  for repo in "$@"; do
    if [[ -f /etc/cvmfs/repositories.d/$repo/server.conf ]]; then
      # After a reboot or a killed run: the repository's own mounts come back, and a
      # transaction left open by a dead process is aborted.
      cvmfs_server mount "$repo" >/dev/null 2>&1 || true
      if in_transaction "$repo"; then
        say "$repo was left in a transaction: aborting it"
        cvmfs_server abort -f "$repo" >/dev/null
      fi
    else
      say "creating repository $repo (stratum 0 on 127.0.0.1)"
      cvmfs_server mkfs -o root "$repo" >/dev/null
      # The daemon mkfs starts can still hold the repository's lock for a few seconds:
      # wait until a transaction can open and close.
      local _
      for _ in $(seq 1 30); do
        cvmfs_server transaction "$repo" >/dev/null 2>&1 && { cvmfs_server abort -f "$repo" >/dev/null; break; }
        sleep 1
      done
    fi
  done
}

client_config() {  # REPO CACHE
  local repo=$1 cache=$2
  mkdir -p "$cache"
  chown cvmfs:cvmfs "$cache"
  cat >"/etc/cvmfs/config.d/$repo.conf" <<EOF
# Written by scripts/cvmfs.sh: a client of the stratum 0 on this machine.
CVMFS_SERVER_URL=${CVMFS_STRATUM0_URL:-http://127.0.0.1/cvmfs/@fqrn@}
CVMFS_PUBLIC_KEY=/etc/cvmfs/keys/$repo.pub
CVMFS_HTTP_PROXY=DIRECT
CVMFS_CACHE_BASE=$cache
CVMFS_QUOTA_LIMIT=4000
# Layer repositories: files keep the image's owners (the default shows user cvmfs).
CVMFS_CLAIM_OWNERSHIP=no
$(nfiles_setting)
EOF
}

mount_client() {  # REPO DIR CACHE
  local repo=$1 dir=$2 cache=$3
  client_config "$repo" "$cache"
  mkdir -p "$dir"
  mountpoint -q "$dir" || mount -t cvmfs "$repo" "$dir"
}

remount() {  # DIR CACHE: the client looks for a new revision now, not at its TTL
  local dir=$1 cache=$2 repo
  repo=$(getfattr --only-values -n user.fqrn "$dir" 2>/dev/null) || { say "$dir is no CVMFS client mount"; exit 1; }
  cvmfs_talk -p "$cache/shared/cvmfs_io.$repo" remount sync >/dev/null
}

case ${1:-} in
  source)
    src=$(source_of_cvmfs)
    case $src in
      repository) say "CernVM-FS from CERN's repository ($CERN_APT_URL)" ;;
      files) say "CernVM-FS from package files in $CVMFS_DEBS (CERN's repository unreachable)" ;;
      none) loud "NO REAL CERNVM-FS here: a local directory stands in for each repository" ;;
    esac
    echo "$src"
    ;;
  debs) echo "$CVMFS_DEBS" ;;
  install) install_cvmfs "${2:-all}" ;;
  stratum0) shift; stratum0 "$@" ;;
  mount) mount_client "$2" "$3" "$4" ;;
  remount) remount "$2" "$3" ;;
  umount) if mountpoint -q "$2"; then umount "$2"; fi ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
