"""Gateway settings (pydantic-settings, ``BNA_`` environment prefix).

Every field can be set as an environment variable, e.g. ``BNA_MAX_BATCH_SIZE=32``; ``bna serve``'s
``--host/--port/--workers`` flags override the environment.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bna_gateway.models.device import resolve_device

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class Settings(BaseSettings):
    """What an operator can tune. Defaults are safe for a public endpoint except ``api_key`` (off)."""

    model_config = SettingsConfigDict(env_prefix="BNA_", extra="ignore", validate_default=True)

    bundle: Path | None = Field(None, description="bundle directory (the CLI's BUNDLE argument)")
    host: str = Field("127.0.0.1", description="listening address (0.0.0.0 in the container)")
    port: int = Field(8000, ge=1, le=65535, description="listening port")
    workers: int = Field(
        1,
        description=(
            "uvicorn worker processes. Must be 1: the gateway keeps one process per device so that "
            "micro-batching sees every request and the Prometheus counters live in one registry. "
            "Scale out with more containers (one per GPU), each scraped on its own."
        ),
    )
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1' ...")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's own choice)")
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0.0,
        le=100.0,
        description=(
            "sys.setswitchinterval for the gateway process. The inference thread needs the GIL for a moment "
            "between tensor ops; with Python's default 5 ms it can wait that long behind the event loop at "
            "every op, so the default here is 0.5 ms"
        ),
    )

    inference_graph: Literal["frozen", "eager"] = Field(
        "frozen",
        description=(
            "'frozen': f and each twin run as frozen TorchScript graphs, which run without the GIL (the event "
            "loop no longer slows the model down) and fold BatchNorm into the convolutions; each graph is checked "
            "against its eager module at start-up and one that differs is served eagerly (logged). 'eager': plain "
            "PyTorch modules"
        ),
    )

    max_batch_size: int = Field(64, ge=1, le=4096, description="largest batch given to the model")
    max_batch_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="longest a queued image waits for more images to share its batch"
    )
    warmup: Literal["pow2", "all"] = Field(
        "pow2", description="batch sizes warmed before ready: powers of two up to max_batch_size (+ max), or all"
    )

    max_body_bytes: int = Field(16 * MiB, ge=1024, description="largest request body accepted (413 above)")
    max_image_pixels: int = Field(
        16_000_000, ge=1, description="largest width*height of one image (413 above; decompression-bomb guard)"
    )
    max_images_per_request: int = Field(64, ge=1, description="most images in one request (413 above)")

    max_queued_images: int = Field(
        256,
        ge=1,
        description=(
            "admission bound: images waiting for a batch. A /classify request that would pass it is refused at "
            "once with 503 and Retry-After (reason queue_full) instead of waiting behind the others"
        ),
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description=(
            "per-request deadline from admission (body read) to answer: a request whose images have not been "
            "classified by then is answered 503 with Retry-After (reason deadline) and leaves the queue"
        ),
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="the Retry-After header of every 503")
    inline_decode_max_pixels: int = Field(
        262_144,
        ge=0,
        description=(
            "a request whose images hold at most this many pixels in all (read from the image headers) is "
            "decoded on the event loop; a larger one in a worker thread, so it never stalls other requests"
        ),
    )

    header_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="a connection that has not sent a complete request head within this is closed"
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="a request body not complete this long after its head is answered 408 and its connection closed",
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(
        1024,
        ge=1,
        description=(
            "open connections; one more is answered 503 with Retry-After (reason connection_limit) and closed. "
            "Keep it below the process' file-descriptor limit"
        ),
    )

    bundle_watch_interval_s: float = Field(
        2.0,
        ge=0.0,
        description=(
            "how often the bundle path is checked for a re-pointed symlink (a new bundle is then verified, warmed "
            "and swapped in without downtime); 0 turns the check off (SIGHUP still reloads)"
        ),
    )

    api_key: SecretStr | None = Field(
        None, description="when set, /classify and /v1/model need 'Authorization: Bearer <key>'"
    )
    docs: bool | None = Field(
        None,
        description=(
            "serve /docs, /redoc and /openapi.json; by default on without an API key and off with one "
            "(the contract is public in docs/http.md; a keyed gateway need not advertise itself)"
        ),
    )
    quarantine_dir: Path | None = Field(None, description="save flagged images + a JSON record here (off when unset)")
    quarantine_max_files: int = Field(1000, ge=1, description="most quarantined images kept; the oldest go first")

    shutdown_timeout_s: float = Field(30.0, gt=0, description="longest graceful shutdown waits for in-flight requests")
    access_log: bool = Field(False, description="uvicorn access log (one line per request)")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v in ("", None) else v

    @field_validator("docs", mode="before")
    @classmethod
    def _empty_docs_is_default(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("quarantine_dir", "bundle", mode="before")
    @classmethod
    def _empty_path_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        resolve_device(v)  # refuses an unknown name with the accepted ones
        return v.strip().lower()

    @model_validator(mode="after")
    def _one_worker(self) -> "Settings":
        if self.workers != 1:
            raise ValueError(
                f"workers={self.workers}: the gateway runs one worker process per device (micro-batching and "
                "the Prometheus registry are per process); run more containers to scale out"
            )
        return self

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> "Settings":
        if self.max_queued_images < self.max_images_per_request:
            raise ValueError(
                f"max_queued_images={self.max_queued_images} is below max_images_per_request="
                f"{self.max_images_per_request}: the largest request allowed could never be queued"
            )
        return self

    @property
    def docs_enabled(self) -> bool:
        return self.docs if self.docs is not None else self.api_key is None

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0

    def warmup_batch_sizes(self) -> list[int]:
        """Batch sizes run once before the gateway reports ready.

        Eager PyTorch compiles nothing per shape: what a first call pays (CUDA context and cuBLAS/cuDNN
        handles, oneDNN primitive creation, allocator pools) is paid by the first few sizes, and cuDNN's
        per-shape autotuning stays off (``torch.backends.cudnn.benchmark = False``). So by default the
        powers of two up to ``max_batch_size`` (and ``max_batch_size`` itself) are warmed, which keeps
        startup short on CPU; ``warmup='all'`` runs every size from 1 to ``max_batch_size``.
        """
        if self.warmup == "all":
            return list(range(1, self.max_batch_size + 1))
        sizes = {self.max_batch_size}
        size = 1
        while size < self.max_batch_size:
            sizes.add(size)
            size *= 2
        return sorted(sizes)
