"""Reading the daemon's metrics in tests: Prometheus' own parser, one sample looked up
by name and labels, and GET over the root-only unix socket."""

from __future__ import annotations

import http.client
import socket
from typing import Dict, List, Tuple

from prometheus_client.parser import text_string_to_metric_families

Sample = Tuple[str, Dict[str, str], float]


def parse(text: str) -> List[Sample]:
    """Every sample of an exposition, as Prometheus' parser reads it (it raises on a
    malformed one)."""
    return [(s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: List[Sample], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for n, lab, v in samples if n == name and all(
        lab.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def http_get(path: str, url: str = "/metrics") -> Tuple[int, str, str]:
    """GET `url` over the unix socket `path`: status, Content-Type, body."""
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(path)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()
    finally:
        conn.close()
