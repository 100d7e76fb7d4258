"""The client's error tree, rooted at `SparecyclesError`; each error carries what a caller needs.

`CoordinatorUnavailable` means we never got an answer (nothing listening, connection dropped,
no reply in time); `RequestRejected` means the coordinator answered with a 4xx/5xx.
"""

from __future__ import annotations

from typing import Any


class SparecyclesError(Exception):
    """Root of every failure raised by the client package."""


class CoordinatorUnavailable(SparecyclesError):
    """No answer from the coordinator at `url`."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(
            f"cannot reach the coordinator at {url} ({cause}); is the coordinator running at {url}? "
            "start it with `sparecycles coordinator --broker mqtt://127.0.0.1:1883 "
            "--db sqlite:///sparecycles.db --http 127.0.0.1:8080`, "
            "or point --coordinator / $SPARECYCLES_COORDINATOR at the right address"
        )
        self.url = url
        self.cause = cause


class RequestRejected(SparecyclesError):
    """The coordinator answered `status` >= 400; `message` is its `{"error": ...}` text."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        where = f" ({method} {path})" if method else ""
        super().__init__(f"coordinator rejected the request{where} with {status}: {message}")
        self.status = status
        self.message = message
        self.method = method
        self.path = path

    @property
    def transient(self) -> bool:
        """Bad gateway, unavailable, gateway timeout: what a proxy says while the coordinator restarts."""
        return self.status in (502, 503, 504)


class AuthenticationFailed(RequestRejected):
    """401 or 403: the request was unsigned, its signature or clock was off, or this account may not
    do it (`message` says which)."""


class InsufficientCredit(RequestRejected):
    """402: the account's credit does not cover the job."""


class RateLimited(RequestRejected):
    """429: too many requests; `retry_after` is the coordinator's Retry-After in seconds, if it sent one."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(status, message, method=method, path=path)
        self.retry_after = retry_after


def rejection(status: int, message: str, *, method: str = "", path: str = "",
              retry_after: float | None = None) -> RequestRejected:
    """The `RequestRejected` subclass that fits `status`."""
    if status in (401, 403):
        return AuthenticationFailed(status, message, method=method, path=path)
    if status == 402:
        return InsufficientCredit(status, message, method=method, path=path)
    if status == 429:
        return RateLimited(status, message, method=method, path=path, retry_after=retry_after)
    return RequestRejected(status, message, method=method, path=path)


class JobFailed(SparecyclesError):
    """The job ended in state "failed"; `status` is the coordinator's full job status."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.job = str(status.get("job", "?"))
        self.error: str | None = status.get("error")
        self.failures: list[dict[str, Any]] = list(status.get("failures") or [])
        message = f"job {self.job} failed"
        if self.error:
            message += f": {self.error}"
        if self.failures:
            first = self.failures[0]
            message += f"; {len(self.failures)} task failure(s), first: task {first.get('task')}: "
            message += str(first.get("reason"))
        super().__init__(message)


class WaitTimeout(SparecyclesError, TimeoutError):
    """`wait` gave up after `seconds`; the job may still finish. `last_status` is the last one seen."""

    def __init__(self, job: str, seconds: float, last_status: dict[str, Any] | None) -> None:
        super().__init__(
            f"job {job} did not finish within {seconds:g} s; it keeps running on the coordinator, "
            f"check it with `sparecycles status {job}`"
        )
        self.job = job
        self.seconds = seconds
        self.last_status = last_status


class BadNpz(SparecyclesError, ValueError):
    """Bytes that are not a pickle-free .npz of named arrays, or arrays that cannot be written as one."""
