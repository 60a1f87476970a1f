"""FastAPI dependencies as ``Annotated`` aliases: the runtime, readiness, and the optional bearer token.

All are ``async def``: FastAPI would run plain ``def`` dependencies in its thread pool, a thread hop
per dependency per request that competes with the inference thread for the GIL.
"""
from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bna_gateway.service.errors import Unavailable
from bna_gateway.service.runtime import Runtime, State

_bearer = HTTPBearer(auto_error=False, description="required on /classify and /v1/model when BNA_API_KEY is set")


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_ready(runtime: RuntimeDep) -> Runtime:
    """503 (with Retry-After) until the bundle is loaded and warmed, and again while draining."""
    if not runtime.ready:
        reason = "draining" if runtime.state is State.DRAINING else "not_ready"
        raise Unavailable(reason, f"not ready ({runtime.state.value})")
    return runtime


ReadyRuntime = Annotated[Runtime, Depends(require_ready)]


async def require_api_key(
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """When an API key is configured, demand ``Authorization: Bearer <key>`` (401 otherwise)."""
    key = runtime.settings.api_key
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), key.get_secret_value().encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Annotated[None, Depends(require_api_key)]
