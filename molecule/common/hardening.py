"""The node-side checks of SECURITY.md's "Access" promises, shared by the scenarios'
testinfra tests: the systemd hardening applied to the daemon's units, its sockets
reachable by root only, and no IP socket in the daemon."""

from __future__ import annotations

PROPERTIES = ("NoNewPrivileges", "RestrictAddressFamilies", "CapabilityBoundingSet",
              "RestrictNamespaces", "IPAddressDeny", "MainPID")

# What the unit's process may never have, whatever else changes.
NEVER = ("cap_net_admin", "cap_net_bind_service", "cap_sys_ptrace", "cap_sys_module",
         "cap_setuid")

INET_SOCKETS = """
for i in $(ls -l /proc/{pid}/fd | sed -n 's/.*socket:\\[\\([0-9]*\\)\\]$/\\1/p'); do
  grep -l " $i " /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 && echo "$i"
done
true
"""


def assert_hardened(host, units, sockets) -> None:
    for unit in units:
        cmd = host.run("systemctl show " + unit + "".join(f" -p {p}" for p in PROPERTIES))
        assert cmd.rc == 0, cmd.stderr
        shown = dict(line.split("=", 1) for line in cmd.stdout.splitlines())
        assert shown["NoNewPrivileges"] == "yes", (unit, shown)
        assert shown["RestrictAddressFamilies"] == "AF_UNIX", (unit, shown)
        assert shown["RestrictNamespaces"] == "yes", (unit, shown)
        assert shown["IPAddressDeny"], (unit, shown)
        caps = shown["CapabilityBoundingSet"].split()
        assert "cap_sys_admin" in caps and not set(NEVER) & set(caps), (unit, caps)
        pid = shown["MainPID"]
        assert pid != "0", f"{unit} is not running"
        status = host.file(f"/proc/{pid}/status").content_string
        assert "NoNewPrivs:\t1" in status, (unit, status)
        inet = host.run(INET_SOCKETS.format(pid=pid))
        assert inet.rc == 0 and inet.stdout.strip() == "", (unit, inet.stdout)
    for sock in sockets:
        f = host.file(sock)
        assert f.is_socket and f.mode == 0o600 and f.user == "root", sock
