"""Where detection's trigger optimisations run: in this process, or sharded over a Ray cluster.

Every optimisation is one ``reverse_engineer`` call, whose groups split into fixed chunks
(``reverse.plan_chunks``). The Ray optimiser sends the same chunks, whole, to a pool of actors (one per
GPU, or per ``threads`` CPUs) that hold the model and the clean set once for the whole detection run,
and merges the results in chunk order. A chunk's result depends only on the chunk: its groups' random
draws are seeded from (seed, family, sources, target), and it runs the same batch shapes wherever it
runs. What is left is floating point: the CPU kernels may sum in another order under another number of
threads, so every chunk, here or on an actor, runs under one thread count (``Sharding.threads``, by
default this process's). The detection.json is then the same without Ray, on one worker or on many.
docs/scaling.md.

``ray`` is an optional dependency (``pip install bna-gateway[ray]``), imported only when asked for.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.mitigation.detection.config import ReverseConfig
from bna_gateway.mitigation.detection.reverse import (Chunk, ReverseResult, freeze, merge_results, plan_chunks,
                                                      reverse_engineer, run_chunk)
from bna_gateway.mitigation.detection.suspect import Optimiser
from bna_gateway.mitigation.triggers import TriggerFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sharding:
    """How detection's optimisations are spread.

    ``ray``: None runs them in this process; "auto" joins the Ray cluster that ``RAY_ADDRESS`` or a
    running local head names (else starts one on this machine); "local" starts a fresh one here; any
    other value is a cluster address ("HOST:6379", or a Ray Client "ray://HOST:10001").
    ``workers``: actors (default: one per GPU of the cluster when detection runs on CUDA, else one per
    ``threads`` CPUs). ``threads``: the torch CPU threads every chunk runs with, here and on each actor
    (default: this process's ``torch.get_num_threads()``); runs with the same value give the same result.
    """

    ray: str | None = None
    workers: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.ray is None:
            raise ValueError("workers is a Ray setting: give ray an address, 'auto' or 'local' too")
        if (self.workers is not None and self.workers < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError("workers and threads must be 1 or more")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def sharded_optimiser(sharding: Sharding, device: torch.device | str = "cpu") -> Iterator[Optimiser]:
    """The optimiser detection should run (``detect_backdoor(..., optimiser=...)``), for the block.

    The whole block runs under ``sharding.threads`` torch threads, so that the steps detection runs
    here (scores, success rates) agree between runs as well; with Ray, its actors are stopped after it.
    """
    threads = sharding.threads or torch.get_num_threads()
    with torch_threads(threads):
        if sharding.ray is None:
            yield reverse_engineer
            return
        with RayOptimiser(sharding.ray, sharding.workers, threads, torch.device(device).type == "cuda") as opt:
            yield opt


class ChunkWorker:
    """A Ray actor's state: the frozen model and the clean set, on the actor's device, for the run."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int, device: str) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = freeze(model.to(self.device))
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.chunks = 0

    def run(self, i: int, chunk: Chunk, family: TriggerFamily, cfg: ReverseConfig) -> tuple[int, ReverseResult, int]:
        """Chunk ``i``'s result (on the CPU) and its group-steps."""
        result, group_steps = run_chunk(self.model, self.x, self.y, chunk, family, cfg, tqdm(disable=True))
        self.chunks += 1
        return i, result, group_steps

    def describe(self) -> dict[str, Any]:
        """The actor's torch threads, device and the chunks it has run."""
        return {"threads": torch.get_num_threads(), "device": str(self.device), "chunks": self.chunks}


class RayOptimiser:
    """``reverse_engineer``'s signature, with the chunks run on Ray actors.

    Use it as a context manager: it connects to Ray on entry (unless this process already is) and, on
    exit, stops its actors and leaves the Ray it connected to. Actors start on the first call and are
    kept while later calls bring the same model and clean set.
    """

    def __init__(self, address: str, workers: int | None, threads: int, gpu: bool) -> None:
        self.address, self.workers, self.threads, self.gpu = address, workers, threads, gpu
        self.actors: list[Any] = []
        self.actors_started = 0  # over the run: one pool, unless the model or the clean set changes
        self._held: tuple[Any, ...] = ()
        self._connected = False

    def __enter__(self) -> "RayOptimiser":
        ray = _ray()
        if not ray.is_initialized():
            address = {"auto": None, "local": "local"}.get(self.address, self.address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as exc:
                raise RuntimeError(f"cannot join the Ray cluster at {self.address}: {exc}") from exc
            self._connected = True
        log.info("Ray: %s", ray.cluster_resources())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self._connected:
            _ray().shutdown()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: list[list[int]],
                 targets: list[int] | torch.Tensor, family: TriggerFamily, cfg: ReverseConfig,
                 desc: str = "reverse") -> ReverseResult:
        ray = _ray()
        freeze(model)  # as reverse_engineer leaves it
        chunks = plan_chunks(y, groups, targets, family, cfg)
        pool = ray.util.ActorPool(self._actors_for(model, x, y))
        results: list[ReverseResult | None] = [None] * len(chunks)
        group_steps = 0
        with tqdm(total=cfg.steps * len(chunks), desc=f"{desc} (ray)", unit="step", disable=not cfg.progress) as bar:
            work = pool.map_unordered(lambda actor, job: actor.run.remote(job[0], job[1], family, cfg),
                                      list(enumerate(chunks)))
            for i, result, n in work:
                results[i] = result
                group_steps += n
                bar.update(cfg.steps)
        log.debug("%s: %d groups in %d chunks on %d actors, %d group-steps", desc, len(groups), len(chunks),
                  len(self.actors), group_steps)
        return merge_results(family, results)  # type: ignore[arg-type]

    def describe(self) -> list[dict[str, Any]]:
        """Each actor's torch threads, device and chunks run so far."""
        return _ray().get([a.describe.remote() for a in self.actors])

    def _actors_for(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Any]:
        if self.actors and self._held[0] is model and self._held[1] is x and self._held[2] is y:
            return self.actors
        self._stop()
        ray = _ray()
        n = self.workers or self._default_workers()
        self._warn_if_waiting(n)
        # one copy of the model and the clean set in the object store, fetched once by each actor
        refs = [ray.put(freeze(copy.deepcopy(model)).cpu()), ray.put(x.detach().cpu()), ray.put(y.cpu())]
        resources = {"num_gpus": 1, "num_cpus": 1} if self.gpu else {"num_cpus": self.threads}
        device = "cuda" if self.gpu else "cpu"
        cls = ray.remote(ChunkWorker)
        self.actors = [cls.options(**resources).remote(*refs, self.threads, device) for _ in range(n)]
        self.actors_started += n
        self._held = (model, x, y)
        log.info("Ray: %d actors (%s, %d torch threads each)", n, device, self.threads)
        return self.actors

    def _default_workers(self) -> int:
        res = _ray().cluster_resources()
        if self.gpu:
            n = int(res.get("GPU", 0))
            if n < 1:
                raise RuntimeError("detection runs on CUDA, but the Ray cluster has no GPU: run it with --device cpu, "
                                   "or join a cluster with GPUs")
            return n
        n = int(res.get("CPU", 0)) // self.threads
        if n < 1:
            raise RuntimeError(f"an actor needs {self.threads} CPUs (--threads) and the Ray cluster has "
                               f"{res.get('CPU', 0):g}: lower --threads")
        return n

    def _warn_if_waiting(self, n: int) -> None:
        """Actors that the cluster cannot hold now wait for resources (an autoscaler may add them)."""
        res = _ray().cluster_resources()
        kind, each = ("GPU", 1) if self.gpu else ("CPU", self.threads)
        if n * each > res.get(kind, 0):
            log.warning("Ray: %d actors need %d %ss, the cluster has %g now: some wait until it grows",
                        n, n * each, kind, res.get(kind, 0))

    def _stop(self) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._held = [], ()


def _ray() -> Any:
    try:
        import ray
        import ray.util  # noqa: F401  (ActorPool)
    except ImportError as exc:
        raise RuntimeError("--ray needs the optional dependency ray: pip install 'bna-gateway[ray]'") from exc
    return ray
