"""``POST /classify``: decode request -> batch -> predict -> unbatch -> encode response."""
from __future__ import annotations

import json
import logging
import random
import re
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from bna_gateway.service.admission import Admission
from bna_gateway.service.api.deps import Authorized, ReadyRuntime
from bna_gateway.service.bundles import ServedBundle
from bna_gateway.service.decoding import DecodePolicy, decode_request
from bna_gateway.service.payload import ImagePart, read_body
from bna_gateway.service.predict import BatchOutcome
from bna_gateway.service.quarantine import QuarantineItem
from bna_gateway.service.runtime import Runtime
from bna_gateway.service.schemas import ClassifyResponse, ErrorResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["classify"])

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty, truncated or undecodable image",
        401: "missing or wrong bearer token (only when an API key is configured)",
        408: "the request body did not arrive within body_timeout_s (the connection is closed)",
        413: "body, image dimensions or image count above the limits",
        415: "not an image content type",
        422: "malformed request (e.g. no 'file' field)",
        503: "busy (queue full, or not classified within the deadline), not ready yet, or shutting down; "
        "see Retry-After",
    }.items()
}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def request_id_of(request: Request) -> str:
    """The client's ``X-Request-ID`` when it is short and safe, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"  # an id, not a secret


def encode_response(served: ServedBundle, request_id: str, outcome: BatchOutcome) -> Response:
    """The *encode* stage: JSON bytes built directly (FastAPI's response-model validation would cost more
    than the rest of the request); the shape is ``ClassifyResponse``."""
    names = served.class_names
    predictions = [
        {
            "label": label,
            "class_name": names[label],
            "trigger_detected": flagged,
            "original_label": original,
            "checked_by_twin": checked,
            "confidence": round(confidence, 6),
        }
        for label, original, checked, flagged, confidence in zip(
            outcome.label, outcome.original_label, outcome.checked_by_twin, outcome.trigger_detected, outcome.confidence
        )
    ]
    body = json.dumps({"request_id": request_id, "bundle_version": served.version, "predictions": predictions})
    return Response(body, media_type="application/json", headers={"X-Request-ID": request_id})


async def quarantine_flagged(
    runtime: Runtime,
    served: ServedBundle,
    request: Request,
    request_id: str,
    parts: list[ImagePart],
    outcome: BatchOutcome,
) -> None:
    if runtime.quarantine is None or not any(outcome.trigger_detected):
        return
    client = request.client.host if request.client else None
    items = [
        QuarantineItem(
            data=parts[i].data,
            request_id=request_id,
            index=i,
            original_label=outcome.original_label[i],
            corrected_label=outcome.label[i],
            confidence=outcome.confidence[i],
            filename=parts[i].filename,
            content_type=parts[i].content_type,
            client=client,
            bundle_version=served.version,
        )
        for i, flagged in enumerate(outcome.trigger_detected)
        if flagged
    ]
    await run_in_threadpool(runtime.quarantine.save, items)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=_ERRORS,
    openapi_extra=_REQUEST_BODY,
    summary="classify one or more images; flags and corrects triggered ones",
)
async def classify(request: Request, _auth: Authorized, runtime: ReadyRuntime) -> Response:
    """Multipart ``file`` parts (repeatable) or one raw ``image/*`` body."""
    settings, batcher = runtime.settings, runtime.batcher
    served = runtime.current  # this request's bundle, to the end, whatever is rolled out meanwhile
    assert served is not None
    request_id = request_id_of(request)
    Admission.check_room(batcher)  # before reading a byte of the body
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    admission = Admission(batcher, settings.request_timeout_s)
    policy = DecodePolicy(settings.max_images_per_request, settings.max_image_pixels, settings.inline_decode_max_pixels)
    with batcher.incoming():  # a forming batch may wait for these images (not for a slow upload)
        parts, images = await decode_request(served.decoder, policy, request.headers.get("content-type"), body)
        job = admission.admit(images, served.predictor)
    outcome = await admission.outcome(job)
    await quarantine_flagged(runtime, served, request, request_id, parts, outcome)
    return encode_response(served, request_id, outcome)
