"""Liveness and readiness, in our own paths and in the Open Inference Protocol's (KServe, Triton)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bna_gateway.service.api.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is alive")
async def healthz(runtime: RuntimeDep) -> JSONResponse:
    if not runtime.live:
        return JSONResponse({"detail": f"not alive ({runtime.state.value})"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="f and every twin are loaded and warmed")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    if not runtime.ready:
        return JSONResponse(
            {"detail": f"not ready ({runtime.state.value})"},
            status_code=503,
            headers={"Retry-After": str(runtime.settings.retry_after_s)},
        )
    return JSONResponse({"status": "ready"})


@router.get("/v2/health/live", summary="Open Inference Protocol liveness")
async def oip_live(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"live": runtime.live}, status_code=200 if runtime.live else 503)


@router.get("/v2/health/ready", summary="Open Inference Protocol readiness")
async def oip_ready(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"ready": runtime.ready}, status_code=200 if runtime.ready else 503)
