from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sparecycles.cli.processes import ProcessGroup

from .network import Network


@pytest.fixture
def network(mosquitto_url: str, tmp_path: Path) -> Iterator[Network]:
    """A coordinator on the real Mosquitto; tests add nodes. Each coordinator has a fresh key,
    hence its own topic namespace, so tests sharing the broker never cross-talk."""
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator()
        yield net
