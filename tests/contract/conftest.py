"""Every contract test runs on every backend: the in-memory twin, SQLite in a temporary file, and
PostgreSQL at 127.0.0.1:5432 (database `test`), each test in a schema of its own, dropped after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema


@asynccontextmanager
async def empty_store(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """The `--db` URL of an empty store of `backend`."""
    if backend == "memory":
        yield "memory"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path}/c.db"
    else:
        require_service("PostgreSQL", HOST, PORT)
        async with fresh_schema() as url:
            yield url


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Every backend."""
    async with empty_store(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
async def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The backends whose state outlives the store object: for tests that close and reopen it."""
    async with empty_store(request.param, tmp_path) as url:
        yield url
