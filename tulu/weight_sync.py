"""Trained weights -> inference group, over the bridge, in buckets.

Each pipeline stage's leader streams its stage's tensors (already gathered across TP and named
as Hugging Face names, `tulu.models.convert.iter_hf_weights`) into flat buckets of at most
`bucket_bytes`, one dtype per bucket. A bucket's index (names, shapes, dtypes, offsets) goes
through the bridge's TCPStore; its bytes go by one gloo/NCCL broadcast in the stage's
sub-group ({leader} + inference ranks). Inference ranks turn buckets back into
(name, tensor) pairs lazily, so an engine's weight loader consumes them as they arrive and
never holds more than one bucket beyond its own weights. The bucket buffer is reused
(allocation dominated the send time in the CPU measurements of DESIGN.md section 7).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

if TYPE_CHECKING:  # the sender's packing runs without the launch layer (bench/gpu_check.py)
    from tulu.distributed import BridgeGroup

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)}


@dataclass
class SyncStats:
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    per_stage_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def _key(version: int, stage: int, what) -> str:
    return f"weights/v{version}/s{stage}/{what}"


def _buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size, dtype = 0, None
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != dtype or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
        dtype = t.dtype
    if bucket:
        yield bucket


def send_weights(bridge: BridgeGroup, stage: int, named: Iterable[tuple[str, torch.Tensor]], *, version: int,
                 bucket_bytes: int = 256 << 20) -> SyncStats:
    """Called by the leader of pipeline stage `stage` (bridge rank == stage)."""
    pg, _ = bridge.stage_group(stage)
    stats = SyncStats()
    t0 = time.perf_counter()
    buffer: torch.Tensor | None = None
    for i, bucket in enumerate(_buckets(named, bucket_bytes)):
        dtype = bucket[0][1].dtype
        index, offset = [], 0
        for name, t in bucket:
            index.append([name, list(t.shape), offset])
            offset += t.numel()
        if buffer is None or buffer.numel() < offset or buffer.dtype != dtype:
            buffer = torch.empty(max(offset, bucket_bytes // torch.empty((), dtype=dtype).element_size()), dtype=dtype)
        flat = buffer[:offset]
        for (name, t), (_, _, off) in zip(bucket, index):
            flat[off:off + t.numel()].copy_(t.reshape(-1))
        bridge.store.set(_key(version, stage, i), json.dumps({"dtype": str(dtype), "numel": offset, "index": index}))
        bridge.broadcast(flat, src=0, pg=pg)
        stats.tensors += len(bucket)
        stats.buckets += 1
        stats.bytes += offset * flat.element_size()
    bridge.store.set(_key(version, stage, "count"), str(stats.buckets))
    # An empty bucket closes the stream, so receivers need not poll for the count.
    bridge.store.set(_key(version, stage, stats.buckets), json.dumps({"end": True}))
    stats.seconds = time.perf_counter() - t0
    stats.per_stage_seconds[stage] = stats.seconds
    return stats


def receive_weights(bridge: BridgeGroup, *, version: int, stats: SyncStats | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Called by every inference rank; yields (hf_name, tensor) stage by stage, bucket by bucket.
    Tensors of one bucket are views of that bucket's buffer: consume them before the next."""
    stats = stats if stats is not None else SyncStats()
    t0 = time.perf_counter()
    for stage in range(bridge.num_stages):
        pg, _ = bridge.stage_group(stage)
        i = 0
        while True:
            meta = json.loads(bridge.store.get(_key(version, stage, i)))
            if meta.get("end"):
                break
            flat = torch.empty(meta["numel"], dtype=_DTYPES[meta["dtype"]])
            bridge.broadcast(flat, src=0, pg=pg)
            stats.buckets += 1
            stats.bytes += flat.numel() * flat.element_size()
            for name, shape, off in meta["index"]:
                n = 1
                for d in shape:
                    n *= d
                stats.tensors += 1
                yield name, flat[off:off + n].view(shape)
            i += 1
        stats.per_stage_seconds[stage] = time.perf_counter() - t0
    stats.seconds = time.perf_counter() - t0
