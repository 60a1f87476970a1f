"""``GET /v1/model``: the bundle's manifest summary (classes, detected targets, version)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from bna_gateway.service.api.deps import RuntimeDep
from bna_gateway.service.schemas import ModelSummary

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelSummary, summary="what is being served")
async def model_summary(runtime: RuntimeDep) -> ModelSummary:
    if runtime.bundle is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="no bundle loaded yet")
    return ModelSummary(
        **runtime.bundle.manifest.summary(),
        device=str(runtime.device),
        max_batch_size=runtime.settings.max_batch_size,
    )
