"""The README's SDK example, extracted from README.md and run as written against a real
coordinator and two real nodes: the docs cannot rot without this failing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import models

from .network import Network

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def sdk_example() -> str:
    section = README.read_text().split("## SDK\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md's SDK section has no python block"
    return str(blocks[0])


def test_the_readme_sdk_example_runs_against_a_real_network(network: Network, tmp_path: Path) -> None:
    network.start_node("carol")
    network.start_node("dave")
    (tmp_path / "model.onnx").write_bytes(models.classifier())  # [N, 8] -> probs [N, 4]
    (tmp_path / "example.py").write_text(sdk_example())
    env = {**os.environ, "SPARECYCLES_COORDINATOR": network.url,
           "SPARECYCLES_CONFIG_DIR": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "{'probs': (64, 4)}" in done.stdout
    assert "'verified': 4" in done.stdout  # progress arrived through the job's event stream
