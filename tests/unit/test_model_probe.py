"""The upload probe loads models in a real child process with a real memory limit."""

from __future__ import annotations

import pytest

from coordinator.model_probe import OUT_OF_MEMORY, TOO_SLOW, probe_model
from coordinator.models import InvalidModel
from tests import models


async def test_an_ordinary_model_passes_the_probe() -> None:
    await probe_model(models.classifier(), memory_bytes=1 << 30, seconds=60)


async def test_a_model_that_allocates_without_bound_on_load_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidModel, match=OUT_OF_MEMORY):
        await probe_model(models.memory_bomb(), memory_bytes=512 << 20, seconds=60)


async def test_a_model_that_takes_too_long_to_load_is_refused() -> None:
    with pytest.raises(InvalidModel, match=TOO_SLOW):
        await probe_model(models.deep_mlp(), memory_bytes=1 << 30, seconds=0.01)
