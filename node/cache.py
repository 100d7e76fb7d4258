"""A content-addressed model cache: `<dir>/<sha256>.onnx`, fetched over HTTP, kept under a quota.

A file only gets its final name after its bytes hashed to that name (written to a temporary file
in the same directory, checked, fsynced, then renamed atomically), so a name in the directory is
a promise about its content. Least recently used files go first when the quota is exceeded;
last use is kept in the file's mtime so the order survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import aiohttp
from yarl import URL

from protocol.digests import is_sha256_hex

from .errors import CacheError
from .logs import kv
from .membership import RequestSigner

log = logging.getLogger(__name__)

SUFFIX = ".onnx"
PART_SUFFIX = ".part"
CHUNK = 1024 * 1024


def _open_part(path: Path) -> BinaryIO:
    return path.open("xb")


def _sync_and_close(sink: BinaryIO) -> None:
    sink.flush()
    os.fsync(sink.fileno())  # the bytes are on disk before the rename makes them a cache entry
    sink.close()


class ModelCache:
    """Models by sha256. `fetch()` downloads at most once per digest however many tasks ask."""

    def __init__(self, directory: Path, *, session: aiohttp.ClientSession, base_url: str, quota_bytes: int,
                 validate: Callable[[Path], None] | None = None, signer: RequestSigner | None = None) -> None:
        """`validate(path)` runs (in a thread) on a downloaded file whose digest matched, before it
        is renamed into the cache; it raises to refuse the file (see `node.modelcheck`)."""
        self.directory = directory
        self.quota_bytes = quota_bytes
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._validate = validate
        self._signer = signer
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> size, least recent first
        self._pins: Counter[str] = Counter()
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._checked: dict[str, float] = {}  # digest -> monotonic time until which it needs no stat
        self.downloads = 0
        self._scan()

    def _scan(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(PART_SUFFIX):  # a download interrupted by a crash
                Path(entry.path).unlink(missing_ok=True)
                continue
            digest = entry.name.removesuffix(SUFFIX)
            if entry.name.endswith(SUFFIX) and is_sha256_hex(digest) and entry.is_file():
                st = entry.stat()
                found.append((st.st_mtime, digest, st.st_size))
        for _, digest, size in sorted(found):
            self._entries[digest] = size
        self._evict(keep=None)

    def path(self, digest: str) -> Path:
        if not is_sha256_hex(digest):
            raise CacheError(f"{digest!r} is not a sha256 digest")
        return self.directory / f"{digest}{SUFFIX}"

    @property
    def total_bytes(self) -> int:
        return sum(self._entries.values())

    def digests(self, limit: int = 1024) -> tuple[str, ...]:
        """Cached models, most recently used first (the WorkRequest's scheduling hint)."""
        return tuple(reversed(self._entries))[:limit]

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    async def fetch(self, digest: str) -> Path:
        """The path of the model's file, downloading and verifying it first if needed."""
        path = self.path(digest)
        if digest in self._entries:
            # Checked on disk at most once a second: with small tasks this ran per task, and two
            # syscalls a task showed up in profiles.
            now = time.monotonic()
            if self._checked.get(digest, -1.0) > now:
                self._entries.move_to_end(digest)
                return path
            if path.is_file():
                self._touch(digest, path)
                self._checked[digest] = now + 1.0
                return path
            del self._entries[digest]  # removed behind our back: fetch again
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._download(digest, path), name=f"fetch-model-{digest[:12]}")
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._fetched(digest, t))
        # shield: one waiter giving up (its task cancelled) must not abort the others' download
        return await asyncio.shield(task)

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        """While the block runs, the model is not evicted (a task is about to load or run it)."""
        self._pins[digest] += 1
        try:
            yield
        finally:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    @contextlib.asynccontextmanager
    async def use(self, digest: str) -> AsyncIterator[Path]:
        """The model's path, fetched if needed and pinned until the block exits."""
        with self.pinned(digest):
            yield await self.fetch(digest)

    def _fetched(self, digest: str, task: asyncio.Task[Path]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here so a fetch nobody awaits any more is not reported

    def _touch(self, digest: str, path: Path) -> None:
        self._entries.move_to_end(digest)
        with contextlib.suppress(OSError):
            os.utime(path)

    async def _download(self, digest: str, path: Path) -> Path:
        url = f"{self._base_url}/v1/models/{digest}"
        part = self.directory / f".{digest}.{secrets.token_hex(4)}{PART_SUFFIX}"
        try:
            size = await self._stream(url, digest, part)
            if self._validate is not None:
                await asyncio.to_thread(self._validate, part)
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        self.downloads += 1
        self._entries[digest] = size
        self._entries.move_to_end(digest)
        self._evict(keep=digest)
        log.info(kv("model_cached", model=digest[:12], size=size, cache_bytes=self.total_bytes))
        return path

    async def _stream(self, url: str, digest: str, part: Path) -> int:
        """Download `url` into `part`, hashing on the way; raise unless the bytes hash to `digest`."""
        hasher = hashlib.sha256()
        size = 0
        try:
            target = URL(url)
            headers = self._signer.headers("GET", target) if self._signer is not None else None
            async with self._session.get(target, headers=headers) as resp:
                if resp.status != 200:
                    text = (await resp.text(errors="replace"))[:200]
                    raise CacheError(f"GET {url}: HTTP {resp.status} {text}", transient=resp.status >= 500)
                if resp.content_length is not None and resp.content_length > self.quota_bytes:
                    raise CacheError(f"model {digest[:12]} is {resp.content_length} bytes, "
                                     f"over the cache quota of {self.quota_bytes}")
                sink = await asyncio.to_thread(_open_part, part)
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > self.quota_bytes:
                            raise CacheError(
                                f"model {digest[:12]} exceeds the cache quota of {self.quota_bytes}")
                        hasher.update(chunk)
                        sink.write(chunk)
                    if hasher.hexdigest() != digest:
                        raise CacheError(f"model bytes hash to {hasher.hexdigest()[:12]}, not {digest[:12]}")
                    await asyncio.to_thread(_sync_and_close, sink)
                finally:
                    sink.close()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CacheError(f"GET {url}: {type(exc).__name__}: {exc}", transient=True) from exc
        return size

    def _evict(self, *, keep: str | None) -> None:
        for digest in list(self._entries):
            if self.total_bytes <= self.quota_bytes:
                return
            if digest == keep or self._pins[digest] > 0:
                continue
            size = self._entries.pop(digest)
            self._checked.pop(digest, None)
            self.path(digest).unlink(missing_ok=True)
            log.info(kv("model_evicted", model=digest[:12], size=size))
        if self.total_bytes > self.quota_bytes:
            log.warning(kv("cache_over_quota", bytes=self.total_bytes, quota=self.quota_bytes,
                           reason="models in use cannot be evicted"))

    async def close(self) -> None:
        """Cancel downloads in progress (their partial files are removed)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
