"""node.cache.ModelCache against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from node.cache import ModelCache
from node.errors import CacheError


def blob(n: int, fill: int) -> tuple[str, bytes]:
    data = bytes([fill]) * n
    return hashlib.sha256(data).hexdigest(), data


class ModelServer:
    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.delay = 0.0
        self.app = web.Application()
        self.app.router.add_get("/v1/models/{digest}", self.get)

    def add(self, data: bytes, *, digest: str | None = None) -> str:
        digest = digest or hashlib.sha256(data).hexdigest()
        self.bodies[digest] = data
        return digest

    async def get(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.requests[digest] += 1
        if digest in self.status:
            return web.Response(status=self.status[digest], text="nope")
        if digest not in self.bodies:
            return web.Response(status=404, text="unknown model")
        resp = web.StreamResponse()
        await resp.prepare(request)
        data = self.bodies[digest]
        for i in range(0, len(data), 64):  # in pieces, slowly: concurrent callers overlap
            await resp.write(data[i:i + 64])
            await asyncio.sleep(self.delay)
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[ModelServer, str]]:
    models = ModelServer()
    runner = web.AppRunner(models.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield models, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


MakeCache = Callable[..., ModelCache]


@pytest.fixture
def make_cache(tmp_path: Path, server: tuple[ModelServer, str], http: aiohttp.ClientSession) -> MakeCache:
    def make(quota: int = 10_000, **kw: object) -> ModelCache:
        return ModelCache(tmp_path / "models", session=http, base_url=server[1], quota_bytes=quota, **kw)  # type: ignore[arg-type]
    return make


async def test_concurrent_requests_for_one_model_download_it_once(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    models.delay = 0.01
    digest = models.add(os.urandom(1000))
    cache = make_cache()

    paths = await asyncio.gather(*(cache.fetch(digest) for _ in range(10)))

    assert models.requests[digest] == 1
    assert cache.downloads == 1
    assert len(set(paths)) == 1
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == digest


async def test_a_cached_model_is_not_downloaded_again(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    digest = models.add(b"model bytes")
    cache = make_cache()

    await cache.fetch(digest)
    await cache.fetch(digest)

    assert models.requests[digest] == 1


async def test_bytes_that_do_not_hash_to_the_digest_are_rejected_and_not_kept(
        tmp_path: Path, server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    claimed, _ = blob(100, 1)
    models.add(b"something else entirely", digest=claimed)
    cache = make_cache()

    with pytest.raises(CacheError, match="hash"):
        await cache.fetch(claimed)

    assert claimed not in cache
    assert list((tmp_path / "models").iterdir()) == []


async def test_least_recently_used_models_are_evicted_to_stay_under_quota(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    a, b, c = (models.add(blob(100, i)[1]) for i in (1, 2, 3))
    cache = make_cache(quota=250)

    await cache.fetch(a)
    await cache.fetch(b)
    await cache.fetch(a)  # a is now more recent than b
    await cache.fetch(c)

    assert set(cache.digests()) == {a, c}
    assert not cache.path(b).exists()
    assert cache.path(a).exists() and cache.path(c).exists()
    assert cache.total_bytes == 200
    assert cache.digests() == (c, a)


async def test_a_pinned_model_is_not_evicted(server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    a, b = (models.add(blob(100, i)[1]) for i in (1, 2))
    cache = make_cache(quota=150)

    async with cache.use(a) as path:
        await cache.fetch(b)
        assert path.exists()

    assert a in cache and b in cache  # over quota while a was in use; nothing else could go


async def test_a_model_larger_than_the_quota_is_refused(
        tmp_path: Path, server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    digest = models.add(os.urandom(500))
    cache = make_cache(quota=100)

    with pytest.raises(CacheError, match="quota"):
        await cache.fetch(digest)

    assert list((tmp_path / "models").iterdir()) == []


async def test_http_errors_fail_the_fetch_and_5xx_is_transient(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    missing, _ = blob(10, 7)
    broken, _ = blob(10, 8)
    models.status[broken] = 503
    cache = make_cache()

    with pytest.raises(CacheError, match="404") as not_found:
        await cache.fetch(missing)
    with pytest.raises(CacheError, match="503") as unavailable:
        await cache.fetch(broken)

    assert not not_found.value.transient
    assert unavailable.value.transient


async def test_a_failed_fetch_is_retried_on_the_next_request(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    digest, data = blob(10, 9)
    cache = make_cache()
    with pytest.raises(CacheError):
        await cache.fetch(digest)

    models.add(data)
    path = await cache.fetch(digest)

    assert path.read_bytes() == data
    assert models.requests[digest] == 2


async def test_the_validator_can_refuse_a_model(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    digest = models.add(b"bytes that hash fine")

    def refuse(path: Path) -> None:
        raise CacheError(f"refused {path.name}")

    cache = make_cache(validate=refuse)
    with pytest.raises(CacheError, match="refused"):
        await cache.fetch(digest)

    assert digest not in cache and not cache.path(digest).exists()


async def test_a_restarted_cache_finds_its_files_and_removes_partial_downloads(
        tmp_path: Path, server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    a, b = (models.add(blob(100, i)[1]) for i in (1, 2))
    first = make_cache()
    await first.fetch(a)
    await first.fetch(b)
    os.utime(first.path(a), (1, 1))  # a used long ago
    (tmp_path / "models" / f".{a}.dead.part").write_bytes(b"half")

    second = make_cache(quota=150)

    assert second.digests() == (b,)  # a was the least recent, evicted to fit the smaller quota
    assert not list((tmp_path / "models").glob("*.part"))
    await second.fetch(b)
    assert models.requests[b] == 1


async def test_a_file_deleted_behind_the_caches_back_is_fetched_again(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    digest = models.add(b"model")
    cache = make_cache()
    (await cache.fetch(digest)).unlink()

    path = await cache.fetch(digest)

    assert path.exists() and models.requests[digest] == 2


async def test_one_waiter_giving_up_does_not_abort_the_download_for_others(
        server: tuple[ModelServer, str], make_cache: MakeCache) -> None:
    models, _ = server
    models.delay = 0.01
    digest = models.add(os.urandom(640))
    cache = make_cache()
    impatient = asyncio.create_task(cache.fetch(digest))
    patient = asyncio.create_task(cache.fetch(digest))
    await asyncio.sleep(0.02)

    impatient.cancel()
    path = await patient

    assert path.exists() and models.requests[digest] == 1
    with pytest.raises(asyncio.CancelledError):
        await impatient
