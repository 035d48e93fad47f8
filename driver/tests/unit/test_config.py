"""The configuration file: defaults, and errors that name what is wrong."""

from __future__ import annotations

import pytest

from cvmfs_graphdriver.cli import main
from cvmfs_graphdriver.config import Config, ConfigError, load, parse


def test_empty_file_means_defaults():
    cfg = parse("")
    assert cfg == Config()
    assert cfg.socket == "/run/docker/plugins/cvmfs.sock"
    assert cfg.log_level == "info"
    assert cfg.sync_layers is True


def test_every_key_is_read():
    cfg = parse(
        "# comment\n[driver]\nsocket = /run/x/y.sock\nlog_level = debug\nsync_layers = no\n"
    )
    assert cfg == Config(socket="/run/x/y.sock", log_level="debug", sync_layers=False)


@pytest.mark.parametrize("raw, value", [("1", True), ("Yes", True), ("on", True),
                                        ("true", True), ("0", False), ("OFF", False),
                                        ("False", False)])
def test_booleans(raw, value):
    assert parse(f"[driver]\nsync_layers = {raw}\n").sync_layers is value


def test_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(ConfigError) as e:
        parse("[driver]\nsokcet = /run/x.sock\n", "/etc/cvmfs-graphdriver/config.ini")
    msg = str(e.value)
    assert "/etc/cvmfs-graphdriver/config.ini" in msg
    assert "'sokcet'" in msg
    assert "socket" in msg and "log_level" in msg and "sync_layers" in msg


def test_unknown_section_is_named():
    with pytest.raises(ConfigError) as e:
        parse("[drivr]\nsocket = /x\n", "cfg.ini")
    assert "[drivr]" in str(e.value) and "[driver]" in str(e.value)


def test_bad_bool_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        parse("[driver]\nsync_layers = maybe\n")
    assert "sync_layers" in str(e.value) and "'maybe'" in str(e.value)


def test_bad_log_level_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        parse("[driver]\nlog_level = verbose\n")
    msg = str(e.value)
    assert "'verbose'" in msg
    for level in ("debug", "info", "warning", "error"):
        assert level in msg


def test_relative_socket_is_refused():
    with pytest.raises(ConfigError) as e:
        parse("[driver]\nsocket = plugin.sock\n")
    assert "plugin.sock" in str(e.value) and "absolute" in str(e.value)


def test_syntax_error_names_the_file():
    with pytest.raises(ConfigError) as e:
        parse("socket = /x\n", "/etc/c.ini")
    assert "/etc/c.ini" in str(e.value)


def test_flags_override_and_are_validated():
    cfg = Config().replace(socket="/run/other.sock", log_level=None, sync_layers=False)
    assert cfg == Config(socket="/run/other.sock", sync_layers=False)
    with pytest.raises(ConfigError):
        Config().replace(log_level="loud")


def test_load_explicit_missing_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as e:
        load(str(missing))
    assert str(missing) in str(e.value)


def unreadable_configs(tmp_path):
    """A directory, a file that cannot be opened (a symlink loop stands in for one that
    is unreadable: the tests run as root) and a file that is not UTF-8."""
    loop = tmp_path / "loop.ini"
    loop.symlink_to(loop)
    latin = tmp_path / "latin.ini"
    latin.write_bytes("[driver]\n# caf\xe9\n".encode("latin-1"))
    return ((tmp_path, "is a directory"), (loop, "cannot read the configuration file"),
            (latin, "is not UTF-8 text"))


def test_load_words_an_unreadable_file_as_a_config_error(tmp_path):
    for path, says in unreadable_configs(tmp_path):
        with pytest.raises(ConfigError, match=says):
            load(str(path))


@pytest.mark.parametrize("command", [["show-config"], ["status"]])
def test_commands_say_what_is_wrong_with_an_unreadable_config(tmp_path, capsys, command):
    """The commands print the error and exit 2 (a configuration error), no traceback
    (the daemon's serve and snapshotter go through the same load)."""
    from cvmfs_graphdriver import cli
    for path, says in unreadable_configs(tmp_path):
        assert cli.main([*command, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def test_load_reads_the_file(tmp_path):
    p = tmp_path / "c.ini"
    p.write_text("[driver]\nlog_level = warning\n")
    assert load(str(p)) == Config(log_level="warning")



@pytest.mark.parametrize("raw, value", [("0", 0), ("1048576", 1048576), ("50G", 50 << 30),
                                        ("50 GiB", 50 << 30), ("2t", 2 << 40),
                                        ("512k", 512 << 10)])
def test_max_layer_bytes_takes_bytes_or_binary_units(raw, value):
    assert parse(f"[driver]\nmax_layer_bytes = {raw}\n").max_layer_bytes == value


@pytest.mark.parametrize("raw", ["-1", "1.5G", "10MB", "lots", ""])
def test_bad_max_layer_bytes_names_key_and_value(raw):
    with pytest.raises(ConfigError) as e:
        parse(f"[driver]\nmax_layer_bytes = {raw}\n")
    assert "max_layer_bytes" in str(e.value) and repr(raw) in str(e.value)


def test_max_layer_bytes_is_no_limit_of_its_own_by_default_and_shown(capsys):
    assert Config().max_layer_bytes == 0
    with pytest.raises(ConfigError):
        Config().replace(max_layer_bytes=-1)
    assert main(["show-config", "--config", "/dev/null"]) == 0
    assert "max_layer_bytes = 0" in capsys.readouterr().out.splitlines()
