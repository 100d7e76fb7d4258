"""The AppKeys the HTTP handlers share: one module, so handler modules need not import each other."""

from __future__ import annotations

from aiohttp import web

from .service import Coordinator

COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator", Coordinator)
