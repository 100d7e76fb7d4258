"""The aiohttp Application: settings and the coordinator behind AppKeys, one cleanup context."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .http_api import COORDINATOR, add_routes
from .http_auth import make_middleware
from .service import Coordinator
from .settings import CoordinatorSettings
from .store import StorageFull, StoreError

log = logging.getLogger("sparecycles.coordinator.http")


@web.middleware
async def json_errors(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error answers JSON with a hint, including aiohttp's own (413, 404, 405)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        message = {413: "request body too large: raise --max-body or send less per job",
                   404: "no such endpoint: see docs/http-api.md",
                   405: "method not allowed on this endpoint"}.get(exc.status, exc.reason)
        return web.json_response({"error": message}, status=exc.status)
    except StoreError as exc:
        # The database is away or full: say so, and that nothing accepted before was lost (the
        # coordinator keeps what it could not commit and retries). 507 tells a full disk apart.
        log.error("store error path=%s: %s", request.path, exc)
        status = 507 if isinstance(exc, StorageFull) else 503
        return web.json_response({"error": f"{exc}; try again shortly"}, status=status,
                                 headers={"Retry-After": "5"})
    except Exception:
        log.exception("unhandled error path=%s", request.path)
        return web.json_response({"error": "internal error: see the coordinator's log"}, status=500)


def make_app(settings: CoordinatorSettings) -> web.Application:
    # json_errors outermost: the authentication middleware's own refusals and aiohttp's 413 while it
    # reads a body come back as JSON too.
    authenticate = make_middleware(lambda request: request.app[COORDINATOR].membership)
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors, authenticate])

    async def coordinator_ctx(app: web.Application) -> AsyncIterator[None]:
        coordinator = Coordinator(settings)
        app[COORDINATOR] = coordinator
        await coordinator.start()
        yield
        await coordinator.stop()

    app.cleanup_ctx.append(coordinator_ctx)
    add_routes(app)
    return app

