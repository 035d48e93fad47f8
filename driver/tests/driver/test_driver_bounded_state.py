"""What the soak (tests/soak, issue 11) found: the driver's in-memory state must not grow
with the number of layers it has ever seen, only with the layers that exist.

A daemon that lives for months creates and removes a layer for every container (and its
init layer), commit and pull: per-layer bookkeeping kept after Remove is a slow leak."""

from __future__ import annotations

from typing import Any, Dict

import pytest
from layer_tools import TarBuilder, make_layer

pytestmark = pytest.mark.root


def _sizes(*objects: Any) -> Dict[str, int]:
    """The sizes of every dict, list and set the objects hold (by attribute name)."""
    out = {}
    for obj in objects:
        for name, value in vars(obj).items():
            if isinstance(value, (dict, list, set, frozenset)):
                out[f"{type(obj).__name__}.{name}"] = len(value)
    return out


def _container_cycle(drv, base: str) -> None:
    """What dockerd does for `docker run --rm` on an image: an init layer and a
    container layer, mounted, unmounted, removed."""
    init = make_layer(drv, base, rw=True)
    ctr = make_layer(drv, init, rw=True)
    drv.get(ctr)
    drv.put(ctr)
    drv.remove(ctr)
    drv.remove(init)


def test_removed_layers_leave_no_per_layer_state(drv):
    base = make_layer(drv, data=TarBuilder().file("f", b"x").bytes())
    for _ in range(5):
        _container_cycle(drv, base)
    before = _sizes(drv, drv.thin, drv.thin.markers)
    for _ in range(40):
        _container_cycle(drv, base)
    after = _sizes(drv, drv.thin, drv.thin.markers)
    grown = {k: (before.get(k), v) for k, v in after.items() if v > before.get(k, 0)}
    assert not grown, f"in-memory state grows with removed layers: {grown}"
