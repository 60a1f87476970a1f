"""``GET /v1/model``: the bundle's manifest summary (classes, detected targets, version)."""
from __future__ import annotations

from fastapi import APIRouter

from bna_gateway.service.api.deps import Authorized, RuntimeDep
from bna_gateway.service.errors import Unavailable
from bna_gateway.service.schemas import ModelSummary

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelSummary, summary="what is being served")
async def model_summary(_auth: Authorized, runtime: RuntimeDep) -> ModelSummary:
    """Needs the bearer token when an API key is set: the detected targets and their source classes tell
    an attacker which backdoor the defence knows about."""
    served = runtime.current
    if served is None:
        raise Unavailable("not_ready", "no bundle loaded yet")
    return ModelSummary(
        **served.bundle.manifest.summary(),
        device=str(runtime.device),
        max_batch_size=runtime.settings.max_batch_size,
    )
