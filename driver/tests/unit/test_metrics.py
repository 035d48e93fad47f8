"""The metrics' exposition format (checked with Prometheus' own Python parser), the
textfile writer, the unix socket and the repository probe; no root needed."""

from __future__ import annotations

import logging
import os
import stat
import threading
from typing import Dict, List, Tuple

import pytest
from metrics_tools import Sample, http_get, value
from prometheus_client.parser import text_string_to_metric_families

from cvmfs_graphdriver import __version__, config, metrics
from cvmfs_graphdriver.errors import DriverError


def parse(text: str) -> Tuple[Dict[str, str], List[Sample]]:
    """{family: type} and every sample, as Prometheus' parser reads the text."""
    types, samples = {}, []
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        samples += [(s.name, dict(s.labels), s.value) for s in fam.samples]
    return types, samples


GAUGES: metrics.Samples = {
    metrics.LAYERS.name: {("regular",): 3, ("thin",): 1, ("lazy",): 2},
    metrics.MOUNTED_LAYERS.name: {(): 2},
    # a label value with every character the format escapes
    metrics.REPOSITORY_MOUNTS.name: {('we"ird\\repo\nname',): 1, ("a.repo",): 0},
}


@pytest.mark.parametrize("face", [metrics.FACE_GRAPHDRIVER, metrics.FACE_SNAPSHOTTER])
def test_every_face_renders_what_prometheus_parses(face: str) -> None:
    text = metrics.render(face, GAUGES)
    types, samples = parse(text)
    # the parser drops the _total suffix from counter family names
    want = {f.full_name.removesuffix("_total") if f.type == "counter" else f.full_name: f.type
            for f in metrics.FACE_FAMILIES[face]}
    assert types == want
    assert all(lab["face"] == face for _, lab, _ in samples)
    assert value(samples, "cvmfs_graphdriver_build_info", version=__version__) == 1
    assert value(samples, "cvmfs_graphdriver_layers", kind="thin") == 1
    assert value(samples, "cvmfs_graphdriver_repository_mounts",
                 repository='we"ird\\repo\nname') == 1
    for family in metrics.FACE_FAMILIES[face]:
        assert f"# HELP {family.full_name} " in text
        assert f"# TYPE {family.full_name} {family.type}\n" in text
        assert family.full_name.startswith("cvmfs_graphdriver_")
        assert (family.type == "counter") == family.full_name.endswith("_total")


def test_counters_show_what_was_counted() -> None:
    before = parse(metrics.render(metrics.FACE_GRAPHDRIVER, {}))[1]
    metrics.applied(1000, 0.25)
    metrics.applied(24, 0.5)
    metrics.descriptor_errors.inc()
    metrics.lazy_layers.inc(1, metrics.LAZY_SERVED)
    after = parse(metrics.render(metrics.FACE_GRAPHDRIVER, {}))[1]
    snap = parse(metrics.render(metrics.FACE_SNAPSHOTTER, {}))[1]

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("cvmfs_graphdriver_applydiff_total") == 2
    assert grew("cvmfs_graphdriver_applydiff_bytes_total") == 1024
    assert grew("cvmfs_graphdriver_applydiff_seconds_total") == pytest.approx(0.75)
    assert grew("cvmfs_graphdriver_descriptor_errors_total") == 1
    # both outcomes are there from the start, at 0 if nothing happened
    assert value(snap, "cvmfs_graphdriver_lazy_layers_total", outcome="served") >= 1
    assert value(snap, "cvmfs_graphdriver_lazy_layers_total", outcome="downloaded") >= 0
    # what does not apply to a face is not in its exposition
    assert not [n for n, _, _ in snap if "applydiff" in n]
    assert not [n for n, _, _ in after if "lazy_layers" in n]


def test_format_details() -> None:
    assert metrics.format_value(3.0) == "3"
    assert metrics.format_value(0.5) == "0.5"
    assert metrics.format_value(float("inf")) == "+Inf"
    assert metrics.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# ---------------------------------------------------------------------------- textfile


def exporter(tmp_path, **kw) -> metrics.Exporter:
    return metrics.Exporter(metrics.FACE_GRAPHDRIVER, lambda: GAUGES, **kw)


def test_textfile_is_replaced_atomically_and_readable_by_node_exporter(tmp_path) -> None:
    ex = exporter(tmp_path, textfile_dir=str(tmp_path))
    ex.write_textfile()
    path = tmp_path / "cvmfs_graphdriver.prom"
    first = os.stat(path)
    assert stat.S_IMODE(first.st_mode) == 0o644
    ex.write_textfile()
    assert os.stat(path).st_ino != first.st_ino  # a new file renamed over the old one
    assert os.listdir(tmp_path) == ["cvmfs_graphdriver.prom"]  # no temporary left
    assert value(parse(path.read_text())[1], "cvmfs_graphdriver_layers", kind="regular") == 3


def test_a_textfile_that_cannot_be_written_is_logged_once(tmp_path, caplog) -> None:
    missing = tmp_path / "no-such-dir"
    ex = exporter(tmp_path, textfile_dir=str(missing), interval=0.05)
    with caplog.at_level(logging.INFO, logger="cvmfs_graphdriver.metrics"):
        for _ in range(3):
            ex.update()  # never raises
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1
        assert str(missing / "cvmfs_graphdriver.prom") in warned[0].getMessage()
        missing.mkdir()
        ex.update()
        assert (missing / "cvmfs_graphdriver.prom").exists()
        assert any("written again" in r.getMessage() for r in caplog.records)
        os.unlink(missing / "cvmfs_graphdriver.prom")
        os.rmdir(missing)
        ex.update()
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_collect_that_fails_keeps_the_last_file(tmp_path) -> None:
    calls = []

    def collect() -> metrics.Samples:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return GAUGES

    ex = metrics.Exporter(metrics.FACE_GRAPHDRIVER, collect, textfile_dir=str(tmp_path))
    ex.update()
    text = (tmp_path / "cvmfs_graphdriver.prom").read_text()
    ex.update()
    assert (tmp_path / "cvmfs_graphdriver.prom").read_text() == text


# ---------------------------------------------------------------------------- socket


def test_socket_serves_get_metrics_root_only(tmp_path) -> None:
    path = str(tmp_path / "m.sock")
    ex = exporter(tmp_path, socket_path=path, interval=3600).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        status, ctype, body = http_get(path, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert value(parse(body)[1], "cvmfs_graphdriver_mounted_layers") == 2
        assert http_get(path, "/")[0] == 404
        # requests answered one after another and at once
        results: List[int] = []
        threads = [threading.Thread(target=lambda: results.append(http_get(path, "/metrics")[0]))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [200] * 8
    finally:
        ex.stop()
    assert not os.path.exists(path)


def test_socket_in_use_is_refused(tmp_path) -> None:
    path = str(tmp_path / "m.sock")
    ex = exporter(tmp_path, socket_path=path, interval=3600).start()
    try:
        with pytest.raises(DriverError, match="already serves"):
            exporter(tmp_path, socket_path=path).start()
    finally:
        ex.stop()


# ---------------------------------------------------------------------------- probe


def test_repository_probe(tmp_path) -> None:
    (tmp_path / "up.repo").mkdir()
    (tmp_path / "up.repo" / "x").write_text("")
    (tmp_path / "file.repo").write_text("")
    probe = metrics.RepositoryProbe(str(tmp_path), ["up.repo", "gone.repo", "file.repo"],
                                    timeout=5)
    assert probe.samples() == {("file.repo",): 0, ("gone.repo",): 0, ("up.repo",): 0}
    probe.refresh()
    assert probe.samples() == {("file.repo",): 0, ("gone.repo",): 0, ("up.repo",): 1}


def test_a_hanging_repository_counts_as_unavailable_and_is_probed_once(tmp_path) -> None:
    # a look that blocks until released stands in for a hung CVMFS mount
    release = threading.Event()
    probe = metrics.RepositoryProbe(str(tmp_path), ["hung.repo"], timeout=0.2)
    started: List[int] = []

    def hang(repo: str) -> None:
        started.append(1)
        release.wait(10)

    probe._look = hang  # type: ignore[method-assign]
    probe.refresh()
    probe.refresh()
    assert probe.samples() == {("hung.repo",): 0}
    assert len(started) == 1  # the second round did not start another stuck thread
    release.set()


# ---------------------------------------------------------------------------- config


def test_config_keys() -> None:
    cfg = config.parse("[driver]\nmetrics_textfile_dir = /var/lib/node_exporter\n"
                       "metrics_socket = /run/cvmfs-graphdriver/metrics.sock\n"
                       "metrics_interval = 30\n[snapshotter]\n"
                       "metrics_socket = /run/cvmfs-graphdriver/snapshotter-metrics.sock\n")
    assert cfg.metrics_textfile_dir == "/var/lib/node_exporter"
    assert cfg.metrics_interval == 30
    assert cfg.snapshotter_metrics_socket == "/run/cvmfs-graphdriver/snapshotter-metrics.sock"
    assert config.Config().metrics_textfile_dir == "" and config.Config().metrics_socket == ""
    with pytest.raises(config.ConfigError, match="metrics_textfile_dir.*absolute"):
        config.parse("[driver]\nmetrics_textfile_dir = relative\n")
    with pytest.raises(config.ConfigError, match=r"\[snapshotter\] metrics_socket"):
        config.parse("[snapshotter]\nmetrics_socket = m.sock\n")
    with pytest.raises(config.ConfigError, match="metrics_interval"):
        config.parse("[driver]\nmetrics_interval = 0\n")
