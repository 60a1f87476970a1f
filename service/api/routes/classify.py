"""``POST /classify``: decode request -> batch -> predict -> unbatch -> encode response."""
from __future__ import annotations

import logging
import random
import re
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from bna_gateway.service.api.deps import Authorized, ReadyRuntime
from bna_gateway.service.payload import ImagePart, read_body, split_payload
from bna_gateway.service.predict import BatchOutcome
from bna_gateway.service.quarantine import QuarantineItem
from bna_gateway.service.runtime import Runtime
from bna_gateway.service.schemas import ClassifyResponse, ErrorResponse, Prediction

log = logging.getLogger(__name__)

router = APIRouter(tags=["classify"])

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
INLINE_DECODE_BYTES = 64 * 1024
"""Bodies up to this size are decoded on the event loop (tens of microseconds per small image); larger
ones in a worker thread, so a big image never stalls other requests."""
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty, truncated or undecodable image",
        401: "missing or wrong bearer token (only when an API key is configured)",
        413: "body, image dimensions or image count above the limits",
        415: "not an image content type",
        422: "malformed request (e.g. no 'file' field)",
        503: "not ready yet, or shutting down",
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


def decode_request(runtime: Runtime, content_type: str | None, body: bytes) -> tuple[list[ImagePart], torch.Tensor]:
    """Split the body into images and decode them into one ``uint8`` batch (runs in a worker thread)."""
    assert runtime.decoder is not None
    parts = split_payload(content_type, body, runtime.settings.max_images_per_request)
    images = runtime.decoder.decode_many([(p.data, p.describe(i)) for i, p in enumerate(parts)])
    return parts, images


def encode_response(runtime: Runtime, request_id: str, outcome: BatchOutcome) -> ClassifyResponse:
    assert runtime.bundle is not None
    manifest = runtime.bundle.manifest
    names = manifest.model.class_names
    predictions = [
        Prediction(
            label=label,
            class_name=names[label],
            trigger_detected=flagged,
            original_label=original,
            checked_by_twin=checked,
            confidence=round(confidence, 6),
        )
        for label, original, checked, flagged, confidence in zip(
            outcome.label, outcome.original_label, outcome.checked_by_twin, outcome.trigger_detected, outcome.confidence
        )
    ]
    return ClassifyResponse(request_id=request_id, bundle_version=manifest.bundle_version, predictions=predictions)


async def quarantine_flagged(
    runtime: Runtime, request: Request, request_id: str, parts: list[ImagePart], outcome: BatchOutcome
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
async def classify(request: Request, response: Response, _auth: Authorized, runtime: ReadyRuntime) -> ClassifyResponse:
    """Multipart ``file`` parts (repeatable) or one raw ``image/*`` body."""
    assert runtime.batcher is not None
    request_id = request_id_of(request)
    response.headers["X-Request-ID"] = request_id
    with runtime.batcher.incoming():
        body = await read_body(request, runtime.settings.max_body_bytes)
        content_type = request.headers.get("content-type")
        if len(body) <= INLINE_DECODE_BYTES:
            parts, images = decode_request(runtime, content_type, body)
        else:
            parts, images = await run_in_threadpool(decode_request, runtime, content_type, body)
        pending = runtime.batcher.enqueue(images)
    outcome = await pending
    await quarantine_flagged(runtime, request, request_id, parts, outcome)
    return encode_response(runtime, request_id, outcome)
