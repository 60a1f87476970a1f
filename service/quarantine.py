"""Quarantine: flagged images, exactly as they arrived, each beside a JSON record, in a bounded folder.

Off unless ``BNA_QUARANTINE_DIR`` is set. File names start with a UTC timestamp, so the folder sorts
oldest first; past ``quarantine_max_files`` images the oldest image and its record are deleted.
Writes run in a worker thread (never on the event loop) under a lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"P5", ".pgm"),
    (b"P6", ".ppm"),
)


def image_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return ".bin"


@dataclass(frozen=True)
class QuarantineItem:
    """One flagged image and what the gateway decided about it."""

    data: bytes
    request_id: str
    index: int
    original_label: int
    corrected_label: int
    confidence: float
    filename: str | None = None
    content_type: str | None = None
    client: str | None = None
    bundle_version: str = ""  # the bundle that flagged it (bundles can be rolled out while serving)


class Quarantine:
    def __init__(self, directory: Path, max_files: int) -> None:
        if max_files < 1:
            raise ValueError("quarantine_max_files must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self._lock = threading.Lock()
        self._stems: deque[str] = deque(sorted(p.stem for p in self.directory.glob("*.json")))
        with self._lock:
            self._evict()

    def __len__(self) -> int:
        return len(self._stems)

    def save(self, items: list[QuarantineItem]) -> list[Path]:
        """Write each image and its record; returns the record paths."""
        written: list[Path] = []
        with self._lock:
            for item in items:
                try:
                    written.append(self._write(item))
                except OSError:
                    log.exception("could not quarantine image %d of request %s", item.index, item.request_id)
            self._evict()
        return written

    def _write(self, item: QuarantineItem) -> Path:
        now = datetime.now(timezone.utc)
        stem = f"{now:%Y%m%dT%H%M%S%fZ}_{_UNSAFE.sub('_', item.request_id)[:64]}_{item.index}"
        image_path = self.directory / f"{stem}{image_suffix(item.data)}"
        image_path.write_bytes(item.data)
        record = {
            "time": now.isoformat(timespec="milliseconds"),
            "request_id": item.request_id,
            "index": item.index,
            "original_label": item.original_label,
            "corrected_label": item.corrected_label,
            "confidence": item.confidence,
            "bundle_version": item.bundle_version,
            "client": item.client,
            "filename": item.filename,
            "content_type": item.content_type,
            "sha256": hashlib.sha256(item.data).hexdigest(),
            "image_file": image_path.name,
        }
        record_path = self.directory / f"{stem}.json"
        tmp = record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, record_path)
        self._stems.append(stem)
        log.warning(
            "quarantined image %d of request %s: f said %d, twin corrected to %d",
            item.index, item.request_id, item.original_label, item.corrected_label,
        )
        return record_path

    def _evict(self) -> None:
        while len(self._stems) > self.max_files:
            stem = self._stems.popleft()
            for path in self.directory.glob(f"{stem}.*"):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

