"""Serving benchmark: the gateway against the bare model and a naive FastAPI wrapper, in one run.

(a) bare model: f alone, torch only, batches of the gateway's max batch size (images/s), plus the
    single-image forward time;
(b) naive wrapper: a FastAPI app written here (decode + forward per request, no batching) under uvicorn;
(c) the gateway (``bna serve``) over HTTP at concurrency 1, 16 and 64, with 1 and 16 images per request,
    for clean traffic and for 100%-triggered traffic (every image goes through a twin and is flagged).

Load tool: an async client in this process, one coroutine and one keep-alive connection per concurrent
client, pre-encoded multipart bodies, a warm-up period per cell, then a fixed measuring window. By
default it is a minimal asyncio HTTP/1.1 client written here (``--load-tool raw``); ``--load-tool
httpx`` uses httpx.AsyncClient instead, which on a 2-core machine spends so much CPU per request that
it, not the server, sets the pace at concurrency 64. Prints images/s, requests/s, p50/p99 latency and
the ratios to (a) and (b); writes JSON to ``bench/results/``.

Usage:
    python bench/serving.py                                   # builds a synthetic width-16 bundle
    python bench/serving.py --bundle artifacts/demo/bundle --samples artifacts/demo/samples
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import Annotated

import httpx
import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serving import REPO, free_port, serve_command  # noqa: E402  (tests/serving.py)

log = logging.getLogger("bench.serving")
BOUNDARY = "bnabenchboundary7d1f"
LOAD_TOOLS = {
    "raw": "asyncio HTTP/1.1 keep-alive client (this file), one connection per concurrent client, pre-encoded bodies",
    "httpx": "httpx.AsyncClient, one pooled connection per concurrent client, pre-encoded bodies",
}


# -- naive wrapper (b) -----------------------------------------------------------------------------

def naive_app(bundle_dir: str) -> FastAPI:
    """What a first FastAPI wrapper looks like: decode and forward inside the request, no batching."""
    from models.bundle import load_bundle

    bundle = load_bundle(Path(bundle_dir), "cpu")
    classifier = bundle.router.classifier
    c, h, w = bundle.manifest.model.input.shape
    mode = "L" if c == 1 else "RGB"
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: Annotated[list[UploadFile], File()]) -> dict[str, list[int]]:
        arrays = []
        for f in file:
            img = Image.open(io.BytesIO(await f.read())).convert(mode).resize((w, h))
            arrays.append(np.array(img, dtype=np.uint8).reshape(h, w, c))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
        with torch.inference_mode():
            labels = classifier(x).argmax(dim=1)
        return {"labels": labels.tolist()}

    return app


def serve_naive(bundle_dir: str, port: int, threads: int) -> None:
    import uvicorn

    torch.set_num_threads(threads)
    uvicorn.run(naive_app(bundle_dir), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- inputs ----------------------------------------------------------------------------------------

def load_samples(folder: Path) -> dict[str, list[bytes]]:
    samples = {kind: [p.read_bytes() for p in sorted((folder / kind).glob("*.png"))] for kind in ("clean", "triggered")}
    for kind, images in samples.items():
        if not images:
            raise SystemExit(f"no PNGs in {folder / kind}")
    return samples


def multipart_bodies(images: list[bytes], per_request: int, count: int = 16) -> list[bytes]:
    bodies = []
    for k in range(count):
        body = b""
        for j in range(per_request):
            data = images[(k * per_request + j) % len(images)]
            body += (
                f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{j}.png\"\r\n"
                "Content-Type: image/png\r\n\r\n"
            ).encode() + data + b"\r\n"
        bodies.append(body + f"--{BOUNDARY}--\r\n".encode())
    return bodies


def decode_batch(images: list[bytes], shape: tuple[int, int, int], size: int) -> torch.Tensor:
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    arrays = [np.array(Image.open(io.BytesIO(images[i % len(images)])).convert(mode).resize((w, h))) for i in range(size)]
    x = torch.from_numpy(np.stack(arrays).reshape(size, h, w, c)).permute(0, 3, 1, 2)
    return x.float().div(255).contiguous()


# -- (a) bare model --------------------------------------------------------------------------------

@torch.inference_mode()
def bare_model(bundle_dir: Path, samples: dict[str, list[bytes]], batch: int, seconds: float) -> dict[str, float]:
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir, "cpu")
    f = bundle.router.classifier
    shape = tuple(bundle.manifest.model.input.shape)
    x = decode_batch(samples["clean"], shape, batch)  # type: ignore[arg-type]
    xt = decode_batch(samples["triggered"], shape, batch)  # type: ignore[arg-type]
    one = x[:1]

    cpu_ms_per_image: dict[str, float] = {}

    def rate(fn, arg: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
        for _ in range(3):
            fn(arg)
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            fn(arg)
            n += 1
        cpu_ms_per_image[fn.__class__.__name__] = (time.process_time() - cpu) * 1000 / (n * len(arg))
        return n * len(arg) / (time.perf_counter() - start)

    single = []
    for _ in range(5):
        f(one)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        f(one)
        single.append(time.perf_counter() - t)
    images_per_s = rate(f, x)
    routed = rate(bundle.router, xt)
    return {
        "images_per_s": images_per_s,
        "cpu_ms_per_image": cpu_ms_per_image[type(f).__name__],
        "routed_triggered_images_per_s": routed,
        "single_image_forward_ms": statistics.median(single) * 1000,
        "batch": batch,
    }


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# -- load generator --------------------------------------------------------------------------------

@dataclass
class Cell:
    system: str
    traffic: str
    images_per_request: int
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    flagged_fraction: float | None = None
    server_cpu_ms_per_image: float | None = None
    x_bare: float | None = None
    x_naive: float | None = None


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client connection on asyncio streams (the default load tool)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


async def _drive(url: str, bodies: list[bytes], concurrency: int, warmup: float, seconds: float,
                 tool: str, server_pid: int | None) -> tuple[list[float], int, float, bytes, float | None]:
    parsed = httpx.URL(url)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    latencies: list[float] = []
    errors = 0
    sample_body = b""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def worker(k: int) -> None:
            nonlocal errors, sample_body
            conn = RawConnection(parsed.host, parsed.port or 80)
            i = k
            try:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= stop:
                        return
                    body = bodies[i % len(bodies)]
                    if tool == "httpx":
                        r = await client.post(url, content=body, headers={"Content-Type": content_type})
                        status, data = r.status_code, r.content
                    else:
                        status, data = await conn.post(parsed.raw_path.decode(), body, content_type)
                    t1 = time.perf_counter()
                    i += concurrency
                    if not sample_body and status == 200:
                        sample_body = data
                    if measure_from <= t1 <= stop:
                        if status == 200:
                            latencies.append(t1 - t0)
                        else:
                            errors += 1
            finally:
                await conn.close()

        cpu: list[float | None] = []

        async def cpu_at_window_edges() -> None:
            for edge in (measure_from, stop):
                await asyncio.sleep(max(0.0, edge - time.perf_counter()))
                cpu.append(process_cpu_seconds(server_pid) if server_pid else None)

        await asyncio.gather(cpu_at_window_edges(), *(worker(k) for k in range(concurrency)))
    server_cpu = cpu[1] - cpu[0] if len(cpu) == 2 and None not in cpu else None  # type: ignore[operator]
    return latencies, errors, seconds, sample_body, server_cpu


def measure(system: str, url: str, traffic: str, images: list[bytes], per_request: int, concurrency: int,
            warmup: float, seconds: float, tool: str = "raw", server_pid: int | None = None) -> Cell:
    bodies = multipart_bodies(images, per_request)
    latencies, errors, window, body, server_cpu = asyncio.run(
        _drive(url, bodies, concurrency, warmup, seconds, tool, server_pid))
    n = len(latencies)
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    flagged = None
    if body and system == "gateway":
        preds = json.loads(body)["predictions"]
        flagged = sum(p["trigger_detected"] for p in preds) / len(preds)
    cell = Cell(
        system, traffic, per_request, concurrency, n, errors, window, n / window, n * per_request / window,
        ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.99 * len(ms)))], flagged,
        server_cpu * 1000 / (n * per_request) if server_cpu is not None and n else None,
    )
    log.info("%-7s %-9s %2d img/req c=%-2d  %7.1f req/s %8.1f img/s  p50 %6.1f ms  p99 %6.1f ms  errors %d",
             system, traffic, per_request, concurrency, cell.requests_per_s, cell.images_per_s, cell.p50_ms,
             cell.p99_ms, errors)
    return cell


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- main ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: build a synthetic width-16 one)")
    ap.add_argument("--samples", type=Path, help="folder with clean/ and triggered/ PNGs (default: beside the bundle)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for (a), (b) and (c) alike (default 1)")
    ap.add_argument("--max-batch", type=int, default=64, help="the gateway's max batch size = (a)'s batch (default 64)")
    ap.add_argument("--max-wait-ms", type=float, default=None, help="the gateway's BNA_MAX_BATCH_WAIT_MS (default: its own)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--images-per-request", default="1,16")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring window per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up per cell")
    ap.add_argument("--load-tool", choices=sorted(LOAD_TOOLS), default="raw",
                    help="raw: a minimal asyncio HTTP/1.1 client (default); httpx: httpx.AsyncClient, which needs "
                         "several times more client CPU per request and becomes the bottleneck on small machines")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    ap.add_argument("--serve-naive", nargs=2, metavar=("BUNDLE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_naive:
        serve_naive(args.serve_naive[0], int(args.serve_naive[1]), args.threads)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    per_requests = [int(n) for n in args.images_per_request.split(",")]

    tmp = tempfile.TemporaryDirectory(prefix="bna-bench-")
    bundle_dir, samples_dir = args.bundle, args.samples
    if bundle_dir is None:
        from synthetic_bundle import build_synthetic_bundle

        synthetic = build_synthetic_bundle(Path(tmp.name) / "bundle", n_samples=16)
        bundle_dir, samples_dir = synthetic.path, synthetic.write_samples(Path(tmp.name) / "samples")
        log.info("built a synthetic width-16 resnet18 bundle in %s", bundle_dir)
    if samples_dir is None:
        samples_dir = Path(bundle_dir).parent / "samples"
    samples = load_samples(Path(samples_dir))
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())

    log.info("(a) bare model, batch %d, %d thread(s)", args.max_batch, args.threads)
    bare = bare_model(Path(bundle_dir), samples, args.max_batch, args.seconds)
    log.info("bare: %.0f img/s at batch %d; single image %.2f ms", bare["images_per_s"], args.max_batch,
             bare["single_image_forward_ms"])

    cells: list[Cell] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    port = free_port()
    naive = subprocess.Popen([sys.executable, __file__, "--serve-naive", str(bundle_dir), str(port), "--threads",
                              str(args.threads)], cwd=REPO, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", naive)
        for per_request in per_requests:
            for conc in concurrencies:
                cells.append(measure("naive", f"http://127.0.0.1:{port}/predict", "clean", samples["clean"],
                                     per_request, conc, args.warmup, args.seconds, args.load_tool, naive.pid))
    finally:
        stop(naive)

    port = free_port()
    gw_env = {**env, "BNA_TORCH_THREADS": str(args.threads), "BNA_MAX_BATCH_SIZE": str(args.max_batch),
              "BNA_DEVICE": "cpu", "BNA_API_KEY": "", "BNA_QUARANTINE_DIR": ""}
    if args.max_wait_ms is not None:
        gw_env["BNA_MAX_BATCH_WAIT_MS"] = str(args.max_wait_ms)
    gateway = subprocess.Popen(serve_command(bundle_dir, port), cwd=REPO, env=gw_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", gateway)
        for traffic in ("clean", "triggered"):
            for per_request in per_requests:
                for conc in concurrencies:
                    cells.append(measure("gateway", f"http://127.0.0.1:{port}/classify", traffic, samples[traffic],
                                         per_request, conc, args.warmup, args.seconds, args.load_tool,
                                         gateway.pid))
    finally:
        stop(gateway)

    naive_rps = {(c.images_per_request, c.concurrency): c.requests_per_s for c in cells if c.system == "naive"}
    for c in cells:
        c.x_bare = c.images_per_s / bare["images_per_s"]
        if (c.images_per_request, c.concurrency) in naive_rps:
            base = naive_rps[(c.images_per_request, c.concurrency)]
            c.x_naive = c.requests_per_s / base if base > 0 else None

    def cell(system: str, traffic: str, per_request: int, conc: int) -> Cell | None:
        return next((c for c in cells if (c.system, c.traffic, c.images_per_request, c.concurrency)
                     == (system, traffic, per_request, conc)), None)

    checks = []
    top = max(concurrencies)
    for name, c, value, target in (
        ("clean, 16 img/req, max conc: img/s >= 0.6x bare", cell("gateway", "clean", 16, top), "x_bare", 0.6),
        ("clean, 1 img/req, max conc: req/s >= 1.2x naive", cell("gateway", "clean", 1, top), "x_naive", 1.2),
        ("triggered, 16 img/req, max conc: img/s >= 0.3x bare", cell("gateway", "triggered", 16, top), "x_bare", 0.3),
    ):
        if c is not None:
            got = getattr(c, value)
            checks.append({"check": name, "value": round(got, 3), "target": target, "pass": got >= target})
    c1 = cell("gateway", "clean", 1, 1)
    if c1 is not None:
        limit = 3 * bare["single_image_forward_ms"] + 10
        checks.append({"check": "clean, 1 img/req, conc 1: p99 < 3x bare single forward + 10 ms",
                       "value": round(c1.p99_ms, 2), "target": round(limit, 2), "pass": c1.p99_ms < limit})

    print(f"\nServing benchmark - load tool: {LOAD_TOOLS[args.load_tool]}")
    print(f"bundle {manifest['bundle_version']} ({manifest['model']['arch']} {manifest['model']['arch_kwargs']}), "
          f"torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
          f"{args.seconds:g} s per cell after {args.warmup:g} s warm-up")
    print(f"(a) bare f, batch {args.max_batch}: {bare['images_per_s']:.0f} img/s; f + twin on triggered batch: "
          f"{bare['routed_triggered_images_per_s']:.0f} img/s; single-image forward {bare['single_image_forward_ms']:.2f} ms; "
          f"{bare['cpu_ms_per_image']:.2f} CPU ms per image at batch {args.max_batch}")
    print("cpu ms/img: the server process's CPU time per image answered (all its threads), a figure that other "
          "load on the machine does not inflate the way it does wall-clock rates\n")
    header = f"{'system':8s} {'traffic':9s} {'img/req':>7s} {'conc':>4s} {'req/s':>8s} {'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'x bare':>7s} {'x naive':>7s} {'flagged':>7s} {'cpu ms/img':>10s} {'errors':>6s}"
    print(header)
    print("-" * len(header))
    for c in cells:
        naive_ratio = f"{c.x_naive:.2f}" if c.x_naive is not None else "-"
        flagged = f"{c.flagged_fraction:.2f}" if c.flagged_fraction is not None else "-"
        cpu = f"{c.server_cpu_ms_per_image:.2f}" if c.server_cpu_ms_per_image is not None else "-"
        print(f"{c.system:8s} {c.traffic:9s} {c.images_per_request:7d} {c.concurrency:4d} {c.requests_per_s:8.1f} "
              f"{c.images_per_s:8.1f} {c.p50_ms:8.1f} {c.p99_ms:8.1f} {c.x_bare:7.2f} {naive_ratio:>7s} {flagged:>7s} {cpu:>10s} {c.errors:6d}")
    print()
    for chk in checks:
        print(f"[{'PASS' if chk['pass'] else 'FAIL'}] {chk['check']}: {chk['value']} (target {chk['target']})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "load_tool": LOAD_TOOLS[args.load_tool],
        "bundle": str(args.bundle or "synthetic"),
        "bundle_version": manifest["bundle_version"],
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "seconds_per_cell": args.seconds,
        "max_batch": args.max_batch,
        "bare": bare,
        "cells": [asdict(c) for c in cells],
        "checks": checks,
    }, indent=2))
    print(f"\nwrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
