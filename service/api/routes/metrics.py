"""``GET /metrics``: the Prometheus text exposition of the gateway's registry."""
from __future__ import annotations

from fastapi import APIRouter, Response

from bna_gateway.service.api.deps import RuntimeDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    body, content_type = runtime.metrics.exposition()
    return Response(content=body, media_type=content_type)
