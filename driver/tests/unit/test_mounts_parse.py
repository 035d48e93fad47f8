"""What the kernel says about mounts: /proc/self/mountinfo parsing and lookups."""

from __future__ import annotations

from cvmfs_graphdriver.mounts import (
    MountEntry,
    backing_mount,
    mounts_under,
    parse_mountinfo,
)

MOUNTINFO = "\n".join([
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
    "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw",
    "40 22 254:1 / /var/lib/docker rw,relatime shared:20 - xfs /dev/vdb rw,attr2,inode64",
    "41 40 0:50 / /var/lib/docker/cvmfs/abc/merged rw,relatime - overlay overlay "
    "rw,lowerdir=l/A:l/B,upperdir=abc/diff,workdir=abc/work",
    "42 40 0:51 / /var/lib/docker/cvmfs/with\\040space/merged rw,relatime shared:30 master:7 "
    "- overlay over\\040lay rw,lowerdir=x",
    "43 40 0:52 / /var/lib/docker/cvmfs-other/merged rw - overlay overlay rw",
    "44 22 0:53 / /mnt/tab\\011and\\134backslash rw - tmpfs tmpfs rw",
    "45 41 0:54 / /var/lib/docker/cvmfs/abc/merged/proc rw - proc proc rw",
    "this line is garbage and has no separator",
]) + "\n"


def test_parse_mountinfo_fields_and_escapes():
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 8  # the garbage line is skipped
    by_point = {e.mount_point: e for e in entries}
    spaced = by_point["/var/lib/docker/cvmfs/with space/merged"]
    assert spaced == MountEntry(
        mount_point="/var/lib/docker/cvmfs/with space/merged",
        fs_type="overlay",
        source="over lay",
        options="rw,relatime",
    )
    assert "/mnt/tab\tand\\backslash" in by_point
    assert by_point["/var/lib/docker"].fs_type == "xfs"
    assert by_point["/"].source == "/dev/vda"


def test_parse_mountinfo_of_nothing():
    assert parse_mountinfo("") == []


def test_mounts_under_is_strictly_below_and_deepest_first():
    entries = parse_mountinfo(MOUNTINFO)
    points = mounts_under("/var/lib/docker/cvmfs/", entries)
    assert len(points) == 3
    assert points[0] == "/var/lib/docker/cvmfs/abc/merged/proc"  # unmount nested ones first
    assert set(points[1:]) == {"/var/lib/docker/cvmfs/abc/merged",
                                "/var/lib/docker/cvmfs/with space/merged"}
    # a sibling whose name merely starts with the same characters is not "under"
    assert "/var/lib/docker/cvmfs-other/merged" not in points
    # the prefix itself is not below itself
    assert "/var/lib/docker" not in mounts_under("/var/lib/docker", entries)
    assert mounts_under("/nowhere", entries) == []


def test_backing_mount_is_the_longest_prefix():
    entries = parse_mountinfo(MOUNTINFO)
    m = backing_mount("/var/lib/docker/cvmfs/abc/diff", entries)
    assert m is not None and m.mount_point == "/var/lib/docker" and m.fs_type == "xfs"
    m = backing_mount("/var/lib/docker", entries)
    assert m is not None and m.mount_point == "/var/lib/docker"
    m = backing_mount("/var/lib/dockerfoo", entries)
    assert m is not None and m.mount_point == "/"
    m = backing_mount("/var/lib/docker/cvmfs/abc/merged/etc", entries)
    assert m is not None and m.mount_point == "/var/lib/docker/cvmfs/abc/merged"
