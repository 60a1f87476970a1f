"""Serving benchmark: the gateway against the bare model and a naive FastAPI wrapper, in one run.

(a) bare model: f alone, torch only, batches of the gateway's max batch size (images/s), plus the
    single-image forward time; in the form the gateway runs it (``--graph``, default the frozen graphs of
    ``BNA_INFERENCE_GRAPH=frozen``), and as plain eager PyTorch. The ratios ("x bare") compare the
    gateway with the bare model in the same form, so a faster graph is not counted as gateway gain;
(b) naive wrapper: a FastAPI app written here (decode + forward per request, no batching) under uvicorn;
(c) the gateway (``bna serve``) over HTTP at concurrency 1, 16 and 64, with 1 and 16 images per request,
    for clean traffic and for 100%-triggered traffic (every image goes through a twin and is flagged).

Load tool: an async client in this process, one coroutine and one keep-alive connection per concurrent
client, pre-encoded multipart bodies, a warm-up period per cell, then a fixed measuring window. By
default it is a minimal asyncio HTTP/1.1 client (``bench/loadgen.py``, ``--load-tool raw``); ``--load-tool
httpx`` uses httpx.AsyncClient instead, which on a 2-core machine spends so much CPU per request that
it, not the server, sets the pace at concurrency 64. Prints images/s, requests/s, p50/p99 latency and
the ratios to (a) and (b); writes JSON to ``bench/results/``.

Usage (the demo bundle and its sample images by default: build them with `make demo-build`):
    python bench/serving.py
    python bench/serving.py --bundle DIR --samples DIR        # DIR/clean/*.png and DIR/triggered/*.png
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen import LOAD_TOOLS, Cell, measure, stop, wait_http  # noqa: E402  (bench/loadgen.py)

DEMO = ROOT / "artifacts" / "demo"
BNA = Path(sys.executable).with_name("bna")

log = logging.getLogger("bench.serving")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- naive wrapper (b) -----------------------------------------------------------------------------

def naive_app(bundle_dir: str) -> FastAPI:
    """What a first FastAPI wrapper looks like: decode and forward inside the request, no batching."""
    from bna_gateway.models.bundle import load_bundle

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
            raise SystemExit(f"no PNGs in {folder / kind}: pass --samples DIR with clean/ and triggered/ PNGs")
    return samples


def decode_batch(images: list[bytes], shape: tuple[int, int, int], size: int) -> torch.Tensor:
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    arrays = [np.array(Image.open(io.BytesIO(images[i % len(images)])).convert(mode).resize((w, h))) for i in range(size)]
    x = torch.from_numpy(np.stack(arrays).reshape(size, h, w, c)).permute(0, 3, 1, 2)
    return x.float().div(255).contiguous()


# -- (a) bare model --------------------------------------------------------------------------------

@torch.inference_mode()
def bare_model(bundle_dir: Path, samples: dict[str, list[bytes]], batch: int, seconds: float,
               graph: str = "eager") -> dict[str, float | str]:
    """f alone (and f + twin on triggered images) in one thread, nothing else running: the ceiling the
    gateway is compared with. ``graph="frozen"`` runs the frozen graphs the gateway runs by default."""
    from bna_gateway.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir, "cpu")
    shape = tuple(bundle.manifest.model.input.shape)
    if graph == "frozen" and bundle.router.freeze_graphs(shape):
        log.warning("some graphs could not be frozen; the frozen bare model is partly eager")
    f = bundle.router.logits
    x = decode_batch(samples["clean"], shape, batch)  # type: ignore[arg-type]
    xt = decode_batch(samples["triggered"], shape, batch)  # type: ignore[arg-type]
    one = x[:1]

    def rate(fn, arg: torch.Tensor) -> tuple[float, float]:  # type: ignore[no-untyped-def]
        """(images/s, CPU ms per image)"""
        for _ in range(3):
            fn(arg)
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            fn(arg)
            n += 1
        return n * len(arg) / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / (n * len(arg))

    single = []
    for _ in range(5):
        f(one)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        f(one)
        single.append(time.perf_counter() - t)
    images_per_s, cpu_ms_per_image = rate(f, x)
    routed, _ = rate(bundle.router, xt)
    return {
        "graph": graph,
        "images_per_s": images_per_s,
        "cpu_ms_per_image": cpu_ms_per_image,
        "routed_triggered_images_per_s": routed,
        "single_image_forward_ms": statistics.median(single) * 1000,
        "batch": batch,
    }


# -- load generator --------------------------------------------------------------------------------

# -- (b) and (c) over HTTP ------------------------------------------------------------------------

def naive_cells(args: argparse.Namespace, bundle_dir: Path, samples: dict[str, list[bytes]]) -> list[Cell]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-naive", str(bundle_dir), str(port), "--threads",
                             str(args.threads)], cwd=ROOT)
    cells = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        for per_request in args.images_per_request:
            for conc in args.concurrency:
                cells.append(measure("naive", f"http://127.0.0.1:{port}/predict", "clean", samples["clean"],
                                     per_request, conc, args.warmup, args.seconds, args.load_tool, proc.pid))
    finally:
        stop(proc)
    return cells


def gateway_cells(args: argparse.Namespace, bundle_dir: Path, samples: dict[str, list[bytes]]) -> list[Cell]:
    port = free_port()
    env = {**os.environ, "BNA_TORCH_THREADS": str(args.threads), "BNA_MAX_BATCH_SIZE": str(args.max_batch),
           "BNA_DEVICE": "cpu", "BNA_API_KEY": "", "BNA_QUARANTINE_DIR": "", "BNA_INFERENCE_GRAPH": args.graph,
           # the benchmark measures throughput: admission control must not refuse its closed-loop clients
           "BNA_MAX_QUEUED_IMAGES": str(max(args.concurrency) * max(args.images_per_request) + args.max_batch)}
    if args.max_wait_ms is not None:
        env["BNA_MAX_BATCH_WAIT_MS"] = str(args.max_wait_ms)
    command = [str(BNA), "serve", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = []
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        for traffic in ("clean", "triggered"):
            for per_request in args.images_per_request:
                for conc in args.concurrency:
                    cells.append(measure("gateway", f"http://127.0.0.1:{port}/classify", traffic, samples[traffic],
                                         per_request, conc, args.warmup, args.seconds, args.load_tool, proc.pid))
    finally:
        stop(proc)
    return cells


# -- ratios, acceptance, report --------------------------------------------------------------------

def add_ratios(cells: list[Cell], bare: dict[str, float]) -> None:
    naive_rps = {(c.images_per_request, c.concurrency): c.requests_per_s for c in cells if c.system == "naive"}
    for c in cells:
        c.x_bare = c.images_per_s / bare["images_per_s"]
        base = naive_rps.get((c.images_per_request, c.concurrency))
        c.x_naive = c.requests_per_s / base if base else None


def acceptance(cells: list[Cell], bare: dict[str, float], top: int) -> list[dict[str, Any]]:
    """The issue's targets, on the cells this run measured."""

    def find(traffic: str, per_request: int, conc: int) -> Cell | None:
        return next((c for c in cells if (c.system, c.traffic, c.images_per_request, c.concurrency)
                     == ("gateway", traffic, per_request, conc)), None)

    checks: list[dict[str, Any]] = []
    for name, cell, attr, target in (
        ("clean, 16 img/req, max conc: img/s >= 0.9x bare", find("clean", 16, top), "x_bare", 0.9),
        ("clean, 1 img/req, max conc: req/s >= 1.2x naive", find("clean", 1, top), "x_naive", 1.2),
        ("triggered, 16 img/req, max conc: img/s >= 0.45x bare", find("triggered", 16, top), "x_bare", 0.45),
    ):
        got = getattr(cell, attr) if cell is not None else None
        if got is not None:
            checks.append({"check": name, "value": round(got, 3), "target": target, "pass": got >= target})
    single = find("clean", 1, 1)
    if single is not None:
        limit = 3 * bare["single_image_forward_ms"] + 10
        checks.append({"check": "clean, 1 img/req, conc 1: p99 < 3x bare single forward + 10 ms",
                       "value": round(single.p99_ms, 2), "target": round(limit, 2), "pass": single.p99_ms < limit})
    return checks


def report(args: argparse.Namespace, manifest: dict[str, Any], bare: dict[str, float], cells: list[Cell],
           checks: list[dict[str, Any]]) -> None:
    print(f"\nServing benchmark - load tool: {LOAD_TOOLS[args.load_tool]}")
    print(f"bundle {manifest['bundle_version']} ({manifest['model']['arch']} {manifest['model']['arch_kwargs']}), "
          f"torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
          f"{args.seconds:g} s per cell after {args.warmup:g} s warm-up")
    print(f"(a) bare f ({bare['graph']} graphs), batch {args.max_batch}: {bare['images_per_s']:.0f} img/s "
          f"({bare['cpu_ms_per_image']:.2f} CPU ms per image); f + twin on a triggered batch: "
          f"{bare['routed_triggered_images_per_s']:.0f} img/s; single-image forward {bare['single_image_forward_ms']:.2f} ms")
    print("cpu ms/img: the server process's CPU time (all threads) per image answered; unlike wall-clock rates it "
          "is not inflated by other load on the machine\n")
    header = (f"{'system':8s} {'traffic':9s} {'img/req':>7s} {'conc':>4s} {'req/s':>8s} {'img/s':>8s} {'p50 ms':>8s} "
              f"{'p99 ms':>8s} {'x bare':>7s} {'x naive':>7s} {'flagged':>7s} {'cpu ms/img':>10s} {'errors':>6s}")
    print(header)
    print("-" * len(header))

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for c in cells:
        print(f"{c.system:8s} {c.traffic:9s} {c.images_per_request:7d} {c.concurrency:4d} {c.requests_per_s:8.1f} "
              f"{c.images_per_s:8.1f} {c.p50_ms:8.1f} {c.p99_ms:8.1f} {fmt(c.x_bare):>7s} {fmt(c.x_naive):>7s} "
              f"{fmt(c.flagged_fraction):>7s} {fmt(c.server_cpu_ms_per_image):>10s} {c.errors:6d}")
    print()
    for chk in checks:
        print(f"[{'PASS' if chk['pass'] else 'FAIL'}] {chk['check']}: {chk['value']} (target {chk['target']})")


# -- main ------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEMO / "bundle",
                    help="bundle directory (default: the demo's, artifacts/demo/bundle)")
    ap.add_argument("--samples", type=Path, help="folder with clean/ and triggered/ PNGs (default: beside the bundle)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for (a), (b) and (c) alike (default 1)")
    ap.add_argument("--max-batch", type=int, default=64, help="the gateway's max batch size = (a)'s batch (default 64)")
    ap.add_argument("--max-wait-ms", type=float, default=None, help="the gateway's BNA_MAX_BATCH_WAIT_MS (default: its own)")
    ap.add_argument("--concurrency", default="1,16,64", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--images-per-request", default="1,16", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring window per cell (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up per cell (default 1)")
    ap.add_argument("--graph", choices=["frozen", "eager"], default="frozen",
                    help="the gateway's BNA_INFERENCE_GRAPH, and the form of the bare model (a) it is compared with "
                         "(default frozen, the gateway's default; an eager bare model is measured too)")
    ap.add_argument("--load-tool", choices=sorted(LOAD_TOOLS), default="raw",
                    help="raw: a minimal asyncio HTTP/1.1 client (default); httpx: httpx.AsyncClient, which needs "
                         "several times more client CPU per request and becomes the bottleneck on small machines")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    ap.add_argument("--serve-naive", nargs=2, metavar=("BUNDLE", "PORT"), help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve_naive:
        serve_naive(args.serve_naive[0], int(args.serve_naive[1]), args.threads)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    bundle_dir = Path(args.bundle)
    samples_dir = Path(args.samples or bundle_dir.parent / "samples")
    if not (bundle_dir / "manifest.json").is_file():
        hint = "run `make demo-build` first" if bundle_dir == DEMO / "bundle" else "check the path"
        raise SystemExit(f"no bundle at {bundle_dir}: {hint}, or pass --bundle DIR (and --samples DIR)")
    samples = load_samples(samples_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())

    log.info("(a) bare model (%s graphs), batch %d, %d thread(s)", args.graph, args.max_batch, args.threads)
    bare = bare_model(bundle_dir, samples, args.max_batch, args.seconds, args.graph)
    bare_eager = bare if args.graph == "eager" else bare_model(bundle_dir, samples, args.max_batch, args.seconds)
    log.info("(b) naive FastAPI wrapper")
    cells = naive_cells(args, bundle_dir, samples)
    log.info("(c) the gateway")
    cells += gateway_cells(args, bundle_dir, samples)

    add_ratios(cells, bare)
    checks = acceptance(cells, bare, max(args.concurrency))
    report(args, manifest, bare, cells, checks)
    if bare_eager is not bare:
        print(f"(a') bare f as plain eager PyTorch: {bare_eager['images_per_s']:.0f} img/s, f + twin on a triggered "
              f"batch {bare_eager['routed_triggered_images_per_s']:.0f} img/s; the gateway's 16 img/req at max conc: "
              + ", ".join(f"{c.traffic} {c.images_per_s / bare_eager['images_per_s']:.3f}x" for c in cells
                          if c.system == "gateway" and c.images_per_request == 16 and c.concurrency == max(args.concurrency)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "load_tool": LOAD_TOOLS[args.load_tool],
        "bundle": str(args.bundle),
        "bundle_version": manifest["bundle_version"],
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "seconds_per_cell": args.seconds,
        "max_batch": args.max_batch,
        "bare": bare,
        "bare_eager": bare_eager,
        "cells": [asdict(c) for c in cells],
        "checks": checks,
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
