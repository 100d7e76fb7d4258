"""A plain synchronous face on the async `Client`, for scripts and notebooks without asyncio:

    with SyncClient("http://127.0.0.1:8080", identity=load_or_create_key()) as c:
        outputs = c.run(Path("model.onnx").read_bytes(), {"x": rows})

It owns a private event loop and runs each call to completion on it, so one aiohttp session (and
the coordinator id it signs for) serves every call. Not for use inside a running event loop: there,
use `Client` itself.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

import numpy.typing as npt

from protocol.signing import Identity

from .errors import SparecyclesError
from .sdk import Client

T = TypeVar("T")
Progress = Callable[[dict[str, Any]], None]


class SyncClient:
    def __init__(self, base_url: str, *, identity: Identity | None = None, audience: str | None = None,
                 timeout: float = 300.0) -> None:
        self._loop = asyncio.new_event_loop()
        self.client = Client(base_url, identity=identity, audience=audience, timeout=timeout)

    def _do(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise SparecyclesError("SyncClient cannot run inside an event loop: use `await` with sparecycles.Client")
        if self._loop.is_closed():
            coro.close()
            raise SparecyclesError("this SyncClient is closed: make a new one")
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.client.close())
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # The calls people make most, typed; any other `Client` coroutine method works through __getattr__.
    def ensure_model(self, model: bytes) -> str:
        return self._do(self.client.ensure_model(model))

    def submit(self, model_digest: str, inputs: Mapping[str, npt.ArrayLike], **options: Any) -> dict[str, Any]:
        return self._do(self.client.submit(model_digest, inputs, **options))

    def status(self, job: str, *, read_token: str | None = None) -> dict[str, Any]:
        return self._do(self.client.status(job, read_token=read_token))

    def follow(self, job: str, *, on_progress: Progress | None = None, timeout: float | None = None,
               read_token: str | None = None) -> dict[str, Any]:
        return self._do(self.client.follow(job, on_progress=on_progress, timeout=timeout, read_token=read_token))

    def outputs(self, job: str, *, read_token: str | None = None) -> dict[str, npt.NDArray[Any]]:
        return self._do(self.client.outputs(job, read_token=read_token))

    def jobs(self, *, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self._do(self.client.jobs(state=state, limit=limit))

    def nodes(self) -> list[dict[str, Any]]:
        return self._do(self.client.nodes())

    def cancel(self, job: str) -> dict[str, Any]:
        return self._do(self.client.cancel(job))

    def run(self, model: bytes | str | os.PathLike[str], inputs: Mapping[str, npt.ArrayLike], *,
            on_progress: Progress | None = None, timeout: float | None = None,
            **options: Any) -> dict[str, npt.NDArray[Any]]:
        return self._do(self.client.run(model, inputs, on_progress=on_progress, timeout=timeout, **options))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._do(attr(*args, **kwargs))

        return call


def run(model: bytes | str | os.PathLike[str], inputs: Mapping[str, npt.ArrayLike], *,
        coordinator: str | None = None, identity: Identity | None = None, on_progress: Progress | None = None,
        timeout: float | None = None, **options: Any) -> dict[str, npt.NDArray[Any]]:
    """`sparecycles.run("model.onnx", {"x": rows})` -> outputs: one synchronous call that uploads,
    submits, follows and downloads. `model`: ONNX bytes or a file path. `coordinator` defaults to
    $SPARECYCLES_COORDINATOR, else http://127.0.0.1:8080; `identity` to your account key
    (`load_or_create_key()`), which must be a registered account (`sparecycles account register`).
    `options`: replicas, task_size, final, deadline."""
    if identity is None:
        from .identity import load_or_create_key

        identity = load_or_create_key()
    url = coordinator or os.environ.get("SPARECYCLES_COORDINATOR") or "http://127.0.0.1:8080"
    with SyncClient(url, identity=identity) as client:
        return client.run(model, inputs, on_progress=on_progress, timeout=timeout, **options)
