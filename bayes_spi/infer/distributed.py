"""Data-parallel fitting on ``torch.distributed`` (launched with ``torchrun``, one node or many).

One process without ``torchrun`` uses :data:`LOCAL` (world size 1): every method below is then the identity
or the plain single-process operation, so a fit behaves exactly as it did before this module existed.

Under ``torchrun`` (the environment holds ``WORLD_SIZE > 1``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), :func:`setup_from_env` starts the process group: backend ``nccl`` when the fit runs on CUDA
(each rank on ``cuda:LOCAL_RANK``), ``gloo`` on CPU. Then:

* **Data.** ``batch_size`` is the *global* batch. Every rank draws the same global sequence of index batches
  (:meth:`bayes_spi.dataio.h5.SPIDataset.batch_indices`: no I/O, a function of the seed and the epoch), drops
  the held-out probe patterns, and reads only its own contiguous slice of each batch
  (``numpy.array_split(idx, world)[rank]``): the ranks stream disjoint shards, and the union of one step's
  shards is exactly the batch one process would have taken. The data position (epoch, batch) is therefore
  the same on every rank, and a resume with another number of processes continues at the same place.
* **Gradients.** Pyro's ELBO is evaluated on each rank's shard with the plate scaled by ``N / B_r``; a rank's
  gradient is weighted by its share ``B_r / B`` and summed over ranks (:meth:`Dist.average_gradients`, one
  ``all_reduce`` of a flat buffer after ``backward`` and before clipping and the Adam step), which is exactly
  the gradient of the union batch. An explicit all-reduce is used rather than
  ``torch.nn.parallel.DistributedDataParallel`` because the model and guide are not called through one
  ``forward`` (Pyro's ``TraceEnum_ELBO`` runs both, the EMC warm start and the exact EMC iterations read the
  field through other paths), parameters unused in a stage would need ``find_unused_parameters``, and the
  share weighting of unequal shards is one multiplication here.
* **Global state computed from data** is reduced so that every rank holds the same: the loss, the batch's
  profile fluence level (which shifts the field's ``log_offset`` and the orientation-search cache), the
  metrics terms (weighted means), the encoder's standardisation statistics and the guide's reference photon
  total (from the union of the first batch, :meth:`Dist.prime_guide`), the exact EMC iterations' ``sum w y``
  and ``sum w s`` grids (:meth:`Dist.all_reduce_`), the throughput that sizes the schedule under
  ``--max-minutes`` (rank 0's, broadcast), and the settings derived from the data (rank 0's, broadcast).
  The initial weights are broadcast from rank 0.
* **Files.** Rank 0 alone writes the run directory (config, log, metrics, checkpoints, outputs); the other
  ranks print warnings to stderr only. A checkpoint holds every rank's torch RNG state (``rank_rng``).

Example (one node, 2 processes; see README "Running on many processes and nodes")::

    torchrun --nproc-per-node 2 -m bayes_spi.cli.main fit data.h5 -o run1
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

__all__ = ["Dist", "LOCAL", "current", "setup_from_env", "shutdown", "env_world_size", "env_rank", "shard_slice"]

log = logging.getLogger("bayes_spi")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``), 1 when absent."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected a positive integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def env_rank() -> int:
    """``RANK`` from the environment under ``torchrun`` (``WORLD_SIZE > 1``), else 0."""
    if env_world_size() <= 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK: expected an integer, got {os.environ.get('RANK')!r}") from None


def shard_slice(n: int, rank: int, world: int) -> slice:
    """The slice of ``n`` items that rank ``rank`` of ``world`` takes: contiguous, sizes differ by at most 1,
    in rank order (as ``numpy.array_split``)."""
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass
class Dist:
    """One process's place in a data-parallel fit (``world_size == 1``: a single process, no collectives).

    Attributes:
        rank, world_size, local_rank: as set by ``torchrun``.
        backend: ``"gloo"``, ``"nccl"``, or ``""`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        """More than one process (collectives are used)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory."""
        return self.rank == 0

    # ------------------------------------------------------------------ devices and seeds
    def device_for(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA fit under DDP, else ``device``."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def seed_rank(self, seed: int) -> None:
        """Give ranks > 0 their own random streams (rank 0 keeps ``seed``: one process is unchanged)."""
        if self.rank > 0:
            import pyro

            pyro.set_rng_seed(int(seed) + 1_000_003 * self.rank)

    # ------------------------------------------------------------------ data
    def batches(self, dataset: Any, batch_size: int, *, shuffle: bool, seed: int, start: int, epoch: int,
                exclude: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's part of each global batch of one epoch from batch ``start`` on: ``(indices (b,), counts
        (b, n_y, n_x))``, the patterns in ``exclude`` dropped. One process: the whole batches as
        ``dataset.iter_batches`` streams them. Under DDP only this rank's slice is read; a global batch with
        fewer patterns than ranks is yielded empty on every rank (the caller skips it, every rank alike)."""
        if not self.active:
            for idx, counts in dataset.iter_batches(batch_size, shuffle=shuffle, seed=seed, start=start, epoch=epoch):
                keep = ~np.isin(idx, exclude)
                yield (idx, counts) if keep.all() else (idx[keep], counts[keep])
            return
        empty = np.zeros((0, *dataset.shape), dtype=np.float32)
        for number, idx in enumerate(dataset.batch_indices(batch_size, shuffle=shuffle, seed=seed, epoch=epoch)):
            if number < start:
                continue
            idx = idx[~np.isin(idx, exclude)]
            if len(idx) < self.world_size:
                yield idx[:0], empty
                continue
            mine = idx[shard_slice(len(idx), self.rank, self.world_size)]
            yield mine, dataset.read(mine)

    def owns_block(self, number: int) -> bool:
        """Whether this rank handles block ``number`` of a pass split round-robin (e.g. the data check)."""
        return number % self.world_size == self.rank

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (identity for one process); returns it."""
        if self.active:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def weighted_mean(self, n_local: int, values: Sequence[float]) -> tuple[int, list[float]]:
        """``(total count, [sum_r n_r v_r / sum_r n_r])``: means over ranks weighted by their counts (one
        all-reduce). A NaN anywhere is NaN everywhere, so every rank stops alike."""
        if not self.active:
            return int(n_local), [float(v) for v in values]
        buf = torch.tensor([float(n_local)] + [float(n_local) * float(v) for v in values], dtype=torch.float64,
                           device=self._device())
        self.all_reduce_(buf)
        total = float(buf[0])
        return int(round(total)), [float(x) / max(total, 1e-300) for x in buf[1:].tolist()]

    def weighted_mean_dict(self, n_local: int, values: dict[str, float]) -> dict[str, float]:
        """:meth:`weighted_mean` of a dict of scalars (the same keys on every rank)."""
        keys = sorted(values)
        _, means = self.weighted_mean(n_local, [values[k] for k in keys])
        return dict(zip(keys, means))

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return float(value)
        buf = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        tdist.broadcast(buf, src=0)
        return float(buf[0])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x (b_r, ...)`` along dim 0 in rank order (shards may differ in size)."""
        if not self.active:
            return x
        sizes = self.gather_objects(int(x.shape[0]))
        dev = self._device()
        pad = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=dev)
        pad[: x.shape[0]] = x.to(dev)
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        tdist.all_gather(parts, pad)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)

    def broadcast_modules(self, modules: Sequence[torch.nn.Module]) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``modules``."""
        if not self.active:
            return
        with torch.no_grad():
            for module in modules:
                for t in list(module.parameters()) + list(module.buffers()):
                    buf = t.detach().to(self._device()).clone()
                    tdist.broadcast(buf, src=0)
                    t.copy_(buf.to(t.device))

    def average_gradients(self, params: Sequence[torch.nn.Parameter], share: float) -> None:
        """Set every parameter's ``.grad`` to ``sum_r share_r grad_r`` (``share_r = B_r / B``: the gradient
        of the union batch). Parameters without a gradient on this rank count as zero if another rank has one;
        those without a gradient anywhere keep ``None`` (as in one process)."""
        if not self.active:
            return
        dev = self._device()
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        self.all_reduce_(present)
        used = [p for p, n in zip(params, present.tolist()) if n > 0]
        if not used:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dev, torch.float64)
                          for p in used]) * float(share)
        self.all_reduce_(flat)
        offset = 0
        for p in used:
            n = p.numel()
            g = flat[offset:offset + n].reshape(p.shape).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
            offset += n

    @torch.no_grad()
    def prime_guide(self, guide: torch.nn.Module, images: torch.Tensor) -> None:
        """Set the guide's data statistics that one process takes from its first batch (the encoder's
        standardisation, the reference log photon total) from the union of every rank's first shard, so all
        ranks hold what one process would. No-op for one process or once set."""
        if not self.active:
            return
        encoder = getattr(guide, "encoder", None)
        need_enc = encoder is not None and bool(torch.isnan(encoder.pixel_mean).any())
        need_ref = hasattr(guide, "log_n_ref") and bool(torch.isnan(guide.log_n_ref))
        if not (need_enc or need_ref):
            return
        union = self.gather_rows(images)
        if need_enc:
            from bayes_spi.guides.encoder import transform_counts

            encoder.set_standardisation(transform_counts(union, guide.mask, encoder.transform), guide.mask)
        if need_ref:
            guide._log_totals(union)


#: the single process (no ``torchrun``)
LOCAL = Dist()

_current: Dist = LOCAL


def current() -> Dist:
    """The :class:`Dist` of this process (:data:`LOCAL` unless :func:`setup_from_env` started a group)."""
    return _current


def setup_from_env(device: str = "auto", timeout_minutes: float = 30.0) -> Dist:
    """Start the process group from ``torchrun``'s environment (idempotent); :data:`LOCAL` without one.

    The backend is ``nccl`` when the fit will run on CUDA (``device`` ``auto`` with a GPU, or ``cuda*``), else
    ``gloo``.

    Raises:
        ValueError: a malformed ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, or a CUDA fit with more ranks on a node
            than GPUs.
    """
    global _current
    world = env_world_size()
    if world <= 1:
        _current = LOCAL
        return LOCAL
    if _current.active:
        return _current
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ValueError("RANK/LOCAL_RANK: expected integers set by torchrun with WORLD_SIZE > 1, got "
                         f"RANK={os.environ.get('RANK')!r} LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}") from None
    cuda = torch.cuda.is_available() and (device.startswith("cuda") or device == "auto")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK: expected < {torch.cuda.device_count()} (the GPUs on this node), got "
                             f"{local_rank}: start at most one process per GPU")
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        atexit.register(shutdown)
    _current = Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local_rank, backend=backend)
    if _current.world_size != world:
        raise ValueError(f"WORLD_SIZE: expected the process group's size {_current.world_size}, got {world}")
    return _current


def shutdown() -> None:
    """Leave the process group (if one was started here)."""
    global _current
    if _current.active and tdist.is_initialized():
        tdist.destroy_process_group()
    _current = LOCAL
