"""On-disk layout: ids that cannot name paths outside the home, lower chains, mount options."""

from __future__ import annotations

import pytest

from cvmfs_graphdriver.layout import (
    MAX_DEPTH,
    PAGE_SIZE,
    SHORT_ID_LENGTH,
    Layout,
    lower_chain,
    new_short_id,
    overlay_options,
    validate_id,
)

HEX_ID = "0123456789abcdef" * 4


@pytest.mark.parametrize("good", [HEX_ID, f"{HEX_ID}-init", "a", "layer_1.v2", "A" * 128])
def test_validate_id_accepts_docker_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "..", "../x", "a/../b", "a..b", "a/b", "/abs", "x/", "a\x00b", ".hidden", ".staging",
     "-leading-dash", "_x", "A" * 129, "a b", "a\nb", "abc\n", "abc\r"],
)
def test_validate_id_refuses_names_that_could_escape_the_home(bad):
    with pytest.raises(ValueError) as e:
        validate_id(bad, "parent id")
    assert "invalid parent id" in str(e.value)
    assert repr(bad) in str(e.value)


def test_layout_paths_stay_under_home_and_bad_ids_are_refused():
    lay = Layout("/var/lib/docker/cvmfs")
    assert lay.diff(HEX_ID) == f"/var/lib/docker/cvmfs/{HEX_ID}/diff"
    assert lay.merged(HEX_ID) == f"/var/lib/docker/cvmfs/{HEX_ID}/merged"
    assert lay.applying_marker(HEX_ID) == f"/var/lib/docker/cvmfs/{HEX_ID}/.applying"
    assert lay.short_link("ABC") == "/var/lib/docker/cvmfs/l/ABC"
    # ids are checked where they enter (the protocol, the home's listing), once
    for bad in ("..", "../../etc", "/etc", "l", ".staging", "", "a/b"):
        with pytest.raises(ValueError):
            validate_id(bad)
    assert validate_id(HEX_ID) == HEX_ID


def test_short_ids_are_fixed_length_base32_and_distinct():
    ids = {new_short_id() for _ in range(200)}
    assert len(ids) == 200
    for s in ids:
        assert len(s) == SHORT_ID_LENGTH
        assert set(s) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def test_lower_chain_puts_parent_first_then_its_lowers():
    assert lower_chain(None, "") == ""
    assert lower_chain("P", "") == "l/P"
    assert lower_chain("P", "l/G:l/B") == "l/P:l/G:l/B"


def test_lower_chain_accepts_max_depth_and_refuses_one_more():
    parent_lower = ":".join(f"l/L{i}" for i in range(MAX_DEPTH - 1))
    chain = lower_chain("TOP", parent_lower)
    assert chain.count(":") + 1 == MAX_DEPTH

    too_deep = ":".join(f"l/L{i}" for i in range(MAX_DEPTH))
    with pytest.raises(ValueError) as e:
        lower_chain("TOP", too_deep)
    assert str(MAX_DEPTH + 1) in str(e.value) and str(MAX_DEPTH) in str(e.value)


def _chain(n: int) -> str:
    return ":".join(f"l/{new_short_id()}" for _ in range(n))


def test_overlay_options_short_chain_uses_absolute_paths():
    lay = Layout("/var/lib/docker/cvmfs")
    lower = "l/AAAA:l/BBBB"
    ro = overlay_options(lay, HEX_ID, lower, readonly=True, extra="index=off,")
    assert ro.relative_to is None
    assert ro.target == f"/var/lib/docker/cvmfs/{HEX_ID}/merged"
    assert ro.data == (
        f"index=off,lowerdir=/var/lib/docker/cvmfs/{HEX_ID}/diff:"
        "/var/lib/docker/cvmfs/l/AAAA:/var/lib/docker/cvmfs/l/BBBB"
    )
    assert "upperdir" not in ro.data

    rw = overlay_options(lay, HEX_ID, lower, readonly=False, mount_label="system_u:x:s0")
    assert rw.relative_to is None
    assert rw.data == (
        "lowerdir=/var/lib/docker/cvmfs/l/AAAA:/var/lib/docker/cvmfs/l/BBBB,"
        f"upperdir=/var/lib/docker/cvmfs/{HEX_ID}/diff,"
        f"workdir=/var/lib/docker/cvmfs/{HEX_ID}/work,"
        'context="system_u:x:s0"'
    )


def test_overlay_options_switch_to_home_relative_paths_over_one_page():
    home = "/srv/" + "very-long-data-root-component/" * 8 + "cvmfs"
    lay = Layout(home)
    lower = _chain(125)
    for readonly in (True, False):
        opts = overlay_options(lay, HEX_ID, lower, readonly=readonly, extra="index=off,")
        # the absolute form would not fit into one page ...
        assert 125 * (len(home) + 1) > PAGE_SIZE
        # ... so every path is relative to the home, and the mount runs from there
        assert opts.relative_to == home
        assert home not in opts.data
        assert len(opts.data) < PAGE_SIZE
        assert opts.target == f"{HEX_ID}/merged"
        lowers = opts.data.split("lowerdir=", 1)[1].split(",", 1)[0].split(":")
        expected_lowers = lower.split(":")
        if readonly:
            assert lowers == [f"{HEX_ID}/diff", *expected_lowers]
        else:
            assert lowers == expected_lowers
            assert f"upperdir={HEX_ID}/diff" in opts.data
            assert f"workdir={HEX_ID}/work" in opts.data


def test_overlay_options_stay_absolute_just_below_the_page_limit():
    home = "/h"
    lay = Layout(home)
    lower = _chain(20)
    opts = overlay_options(lay, HEX_ID, lower, readonly=True)
    assert opts.relative_to is None
    limit = len(opts.data) + 1
    assert overlay_options(lay, HEX_ID, lower, readonly=True, page_size=limit).relative_to is None
    assert overlay_options(lay, HEX_ID, lower, readonly=True,
                           page_size=limit - 1).relative_to == home


def test_overlay_options_refuse_when_even_relative_paths_are_too_long():
    lay = Layout("/var/lib/docker/cvmfs")
    lower = _chain(150)  # 150 * len("l/<26>:") > 4096
    with pytest.raises(ValueError) as e:
        overlay_options(lay, HEX_ID, lower, readonly=True)
    assert HEX_ID in str(e.value)
    assert str(PAGE_SIZE - 1) in str(e.value)


def test_overlay_options_refuse_a_layer_without_lowers():
    with pytest.raises(ValueError) as e:
        overlay_options(Layout("/h"), HEX_ID, "", readonly=True)
    assert HEX_ID in str(e.value)
