"""PostgreSQL for tests: the shared server at 127.0.0.1:5432 (database `test`, trust auth, here and
in CI), with a fresh schema per test so that tests never see each other's rows, dropped afterwards."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import quote

import asyncpg

HOST, PORT, DATABASE = "127.0.0.1", 5432, "test"
ADMIN_URL = f"postgresql://postgres@{HOST}:{PORT}/{DATABASE}"


def schema_url(schema: str, base: str = ADMIN_URL) -> str:
    """`base` with every connection's search_path set to `schema` (libpq's `options`, which psql
    understands too)."""
    return f"{base}?options={quote(f'-csearch_path={schema}', safe='')}"


async def _execute(base: str, sql: str) -> None:
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_schema(base: str = ADMIN_URL) -> AsyncIterator[str]:
    """A new empty schema `t_<random>`; yields a URL whose connections use it, drops it on exit."""
    schema = f"t_{secrets.token_hex(6)}"
    await _execute(base, f"CREATE SCHEMA {schema}")
    try:
        yield schema_url(schema, base)
    finally:
        await _execute(base, f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def fresh_schema_sync(base: str = ADMIN_URL) -> Iterator[str]:
    """`fresh_schema` for tests without an event loop of their own (those that run processes)."""
    schema = f"t_{secrets.token_hex(6)}"
    asyncio.run(_execute(base, f"CREATE SCHEMA {schema}"))
    try:
        yield schema_url(schema, base)
    finally:
        asyncio.run(_execute(base, f"DROP SCHEMA {schema} CASCADE"))


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    """Rows of one query, on a connection of its own."""
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()
