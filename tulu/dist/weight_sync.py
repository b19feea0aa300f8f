"""Trained weights -> inference group, over the bridge, in buckets, with bounded memory.

Each pipeline stage's leader streams its stage's tensors (already gathered across TP and named
as Hugging Face names, `tulu.models.convert.iter_hf_weights`) into flat byte buckets of at most
`bucket_bytes` (a tensor larger than that is a bucket of its own, sent from its own memory
without a copy). Per stage and version, through the bridge's TCPStore:

- ``index``: the bucket size and the stage's whole list of ``[name, shape, dtype]``, published
  before the first bucket when the sender knows it up front (a list/tuple/dict of tensors, or
  ``index=``), else ``null`` (a generator such as ``iter_hf_weights``: known only at the end);
- one key per bucket: its entries ``[name, shape, dtype, byte offset]`` and byte size, published
  before the bucket's bytes go by one broadcast in the stage's sub-group ({leader} + inference
  ranks);
- an end marker with the number of tensors sent.

Inference ranks get a :class:`WeightStream`: ``(name, tensor)`` pairs bucket by bucket, where a
bucket's names and shapes can be read (:meth:`WeightStream.buckets`) before its tensors are
used, the announced index (:meth:`WeightStream.announced`) before anything is received, and
:meth:`WeightStream.drain` to receive the rest without using it (so the sender and the other
receivers finish their broadcasts after a receiver rejected the stream). Tensors are views of a
receive buffer; a buffer is reused only once nobody holds a view of it any more (vLLM's layerwise
reload keeps a layer's tensors until the layer is complete), so a receiver holds, per stream, the
bucket being received, the bucket being loaded, and whatever its loader still keeps: two or three
buffers of a bucket's size (or of the largest tensor, when one is larger; those are dropped after
the sync) whatever the model size. The bucket-sized buffers stay allocated between syncs.

Streams: a receiver takes the training stages it needs at once, up to ``streams`` of them (one
thread each, in stage order: every receiver of a stage starts it once its earlier ones are done,
so none waits on another), and the loader gets their buckets interleaved (each stage in order).
Each stream meets its groups through a store client of its own (a blocking get holds its client)
and relays in groups tagged by stage.

Routing: each receiver says what it holds (``receive_weights(..., holds=engine.held_weights())``,
a :class:`HeldWeights`: a vLLM pipeline stage's layers, embedding, head; None = everything) and
on which node it runs (``BridgeGroup(node=...)``). A tensor goes only to the receivers that hold
it, and once per node: the leader broadcasts the bucket to one of them on each node (its
*head*: stage ``s``'s is the ``s``-th, so stages received at once enter a node through different
GPUs' NICs), which broadcasts it on to the others of its node (:func:`_fan_out`); buckets never
mix destinations. ``SyncStats.sent_bytes`` counts the leader's bytes x receiving nodes,
``relayed_bytes`` a head's bytes x its node's other receivers. Still sent to every receiver of an
engine: a PP stage's tensors go to all of its TP ranks as full tensors (vLLM's loader slices
them), and an unrouted receiver (``holds=None``, the default) gets the whole model.

Transport: the bridge's data groups (:meth:`BridgeGroup.group`) are NCCL when the bridge was made
for CUDA (buffers on the process's GPU; a GPU tensor is sent as is, a host one copied into a GPU
bucket) and gloo otherwise (host buffers; a GPU tensor is copied into a host bucket). The code
path is the same; only the group and the buffers' device differ. The NCCL case runs only on GPU
nodes (``bench/gpu_check.py --bridge``); the tests here run gloo.

Contiguous tensors of 4 MiB or a quarter bucket or more are sent as is, from their own memory; smaller
ones are packed, into one of two reused buffers, while the previous bucket is on the wire (two
broadcasts in flight at most). A receiver's stream receives bucket i+1 while the loader consumes
bucket i. A bucket of 64 kB or less (or a 64th of the bucket size: norms, biases) is not
broadcast: its bytes ride in the next bucket's metadata in the store (base64), or alone there when
it is the last or the next bucket goes elsewhere (``SyncStats.inline_tensors``); a per-bucket
broadcast + store round trip cost more than the bytes.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

if TYPE_CHECKING:  # the sender's packing runs without the launch layer (bench/gpu_check.py)
    from tulu.dist.groups import BridgeGroup

__all__ = ["HeldWeights", "SyncStats", "WeightStream", "receive_weights", "send_weights"]

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                               torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool)}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _DTYPES.values()}
# A contiguous tensor this large (or a quarter bucket) is broadcast from its own memory: copying it
# into a bucket costs more than one more broadcast (CPU bench: 4 MB tensors packed into one 64 MB
# bucket ran at 0.6-0.7x a raw broadcast, sent as is at 0.8-1.1x).
_ALONE_BYTES = 4 << 20
_ALIGN = 64  # byte offsets inside a bucket: any dtype's view of the byte buffer is aligned
# A bucket this small (or a 64th of the bucket size, if less: norms, biases) rides in the metadata of the next bucket (base64 in the
# store) instead of a broadcast of its own: a broadcast + a store round trip cost ~1 ms on gloo,
# which a 2 kB norm after every 4 MB matrix turned into 0.7x of a raw broadcast.
_INLINE_BYTES = 64 << 10


@dataclass
class SyncStats:
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    per_stage_seconds: dict[int, float] = field(default_factory=dict)
    copied_bytes: int = 0          # sender: bytes packed into bucket buffers (the rest went as is)
    sent_bytes: int = 0            # sender: bytes it broadcast, once per receiving node (bucket x nodes)
    relayed_bytes: int = 0         # receiver: bytes it passed on to the other receivers of its node
    inline_tensors: int = 0        # tensors of tiny buckets carried in the store, not broadcast
    inline_bytes: int = 0          # their bytes (part of ``bytes``)
    buffers_allocated: int = 0     # receiver: receive buffers allocated (the rest were reused)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def _key(version: int, stage: int, what) -> str:
    return f"weights/v{version}/s{stage}/{what}"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _sendable_as_is(t: torch.Tensor, device: torch.device = torch.device("cpu")) -> bool:
    """Broadcast from its own memory: contiguous and on the bridge's device (host memory on a gloo
    bridge, the process's GPU on an NCCL one); otherwise it is copied into a bucket buffer there."""
    return t.is_contiguous() and t.device == device


def _buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
             alone_bytes: int | None = None, key=None,
             device: torch.device = torch.device("cpu")) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into buckets of at most ``bucket_bytes`` (aligned offsets; any dtypes).
    A tensor of ``bucket_bytes`` or more is a bucket of its own, and so is a contiguous tensor
    of ``alone_bytes`` or more (it is sent from its own memory: packing it would only copy it).
    Tensors of different ``key(name)`` (their receivers) never share a bucket."""
    alone = bucket_bytes if alone_bytes is None else min(alone_bytes, bucket_bytes)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = _nbytes(t)
        if nbytes >= bucket_bytes or (nbytes >= alone and _sendable_as_is(t, device)):
            if bucket:
                yield bucket
                bucket, size = [], 0
            yield [(name, t)]
            continue
        if bucket and (size + nbytes > bucket_bytes or (key is not None and key(name) != key(bucket[0][0]))):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size = _aligned(size + nbytes)
    if bucket:
        yield bucket


def _index_of(named) -> list | None:
    """The whole ``[name, shape, dtype]`` list when ``named`` is already in memory, else None."""
    if isinstance(named, Mapping):
        named = named.items()
    if isinstance(named, (list, tuple)) or (hasattr(named, "__len__") and not hasattr(named, "__next__")):
        return [[n, list(t.shape), str(t.dtype)] for n, t in named]
    return None


@dataclass(frozen=True)
class HeldWeights:
    """The Hugging Face tensors one inference rank holds, for routing: a pipeline stage of a vLLM
    engine holds layers ``[first_layer, end_layer)``, the embedding on its first stage and the final
    norm and ``lm_head`` on its last (a tied model's last stage needs ``embedding=True`` too).
    Names of no layer, embedding or head go to every rank. ``None`` instead of one: everything."""

    first_layer: int
    end_layer: int
    embedding: bool
    head: bool

    def holds(self, name: str) -> bool:
        if name.startswith("model.layers."):
            return self.first_layer <= int(name.split(".", 3)[2]) < self.end_layer
        if name.startswith("model.embed_tokens."):
            return self.embedding
        if name.startswith(("lm_head.", "model.norm.")):
            return self.head
        return True


def _fan_out(to: tuple[int, ...], node_of: Mapping[int, object], stage: int = 0) -> dict[int, tuple[int, ...]]:
    """{node head: the other receivers of ``to`` on its node}: the head takes the bucket from the
    sender and re-broadcasts it on its node. Stage ``s``'s head on a node is its receivers' ``s``-th
    (mod their number): stages received at once come in through different GPUs, so through
    different NICs, instead of queueing at one."""
    on_node: dict[object, list[int]] = {}
    for r in to:
        on_node.setdefault(node_of[r], []).append(r)
    out = {}
    for ranks in on_node.values():
        head = ranks[stage % len(ranks)]
        out[head] = tuple(r for r in ranks if r != head)
    return out


def send_weights(bridge: BridgeGroup, stage: int, named: Iterable[tuple[str, torch.Tensor]] | Mapping, *,
                 version: int, bucket_bytes: int = 256 << 20, index: list | None = None) -> SyncStats:
    """Called by the leader of pipeline stage `stage` (bridge rank == stage).

    ``index`` (``[name, shape, dtype]`` for every tensor ``named`` will yield) lets receivers check
    the whole update before loading any of it; without it, it is taken from ``named`` when that is
    a list/tuple/dict, else receivers can tell a missing tensor only at the end of the stream."""
    stats = SyncStats()
    t0 = time.perf_counter()
    if isinstance(named, Mapping):
        named = list(named.items())
    index = index if index is not None else _index_of(named)
    # before joining the stage group: receivers may read every stage's index first
    bridge.store.set(_key(version, stage, "index"), json.dumps({"bucket_bytes": bucket_bytes, "tensors": index}))
    bridge.stage_group(stage)           # every receiver joins it first
    # Routing: each receiver said what it holds (receive_weights); a tensor goes only to those
    # that hold it, once per node: to the first of them on each node, which passes it on there.
    receivers = tuple(range(bridge.num_stages, bridge.size))
    said = {r: json.loads(bridge.store.get(_key(version, "holds", r))) for r in receivers}
    wrong = {r: x["transport"] for r, x in said.items() if x["transport"] != bridge.backend}
    if wrong:
        raise RuntimeError(f"weight sync v{version}: stage {stage}'s leader sends over {bridge.backend}, but bridge "
                           f"rank(s) {sorted(wrong)} receive over {sorted(set(wrong.values()))}: every bridge member "
                           "must be made with the same device (BridgeGroup(device=...))")
    holds = {r: None if x["holds"] is None else HeldWeights(**x["holds"]) for r, x in said.items()}
    node_of = {r: x["node"] for r, x in said.items()}
    device = bridge.device

    def route(name: str) -> tuple[int, ...]:
        return tuple(r for r in receivers if holds[r] is None or holds[r].holds(name))

    to_counts = dict.fromkeys(receivers, 0)
    # Two pack buffers; at most two broadcasts in flight, so bucket i is packed (or, sent as is,
    # posted) while i - 1 is on the wire; a pack buffer is refilled once its broadcast is done.
    buffers = _SEND_BUFFERS.setdefault(bridge, [torch.empty(0, dtype=torch.uint8, device=device)] * 2)
    buffer_work: list = [None, None]
    in_flight: deque = deque()
    packed = 0
    sent: list[str] = []

    announced = None if index is None else {e[0] for e in index}

    def held_somewhere():
        for name, t in named:
            if announced is not None and name not in announced:
                # receivers that hold nothing announced skip the stage: sending it would hang them
                raise RuntimeError(f"weight sync stage {stage} v{version}: {name!r} is not in the stage's "
                                   f"announced index of {len(index)} tensors (send_weights(index=...) must "
                                   "list every tensor sent)")
            if route(name):
                yield name, t
            else:
                sent.append(name)           # no receiver holds it: not sent

    alone = min(bucket_bytes // 4, _ALONE_BYTES)
    inline_limit = min(_INLINE_BYTES, bucket_bytes // 64)
    published = 0
    riding: tuple | None = None             # (to, inline blob): a tiny bucket waiting for the next one

    def publish(meta: dict) -> None:
        nonlocal published
        bridge.store.set(_key(version, stage, published), json.dumps(meta))
        published += 1

    for bucket in _buckets(held_somewhere(), bucket_bytes, alone, key=route, device=device):
        to = route(bucket[0][0])
        fan = _fan_out(to, node_of, stage)
        entries, offset = [], 0
        for name, t in bucket:
            entries.append([name, list(t.shape), str(t.dtype), offset])
            offset = _aligned(offset + _nbytes(t))
        size = entries[-1][3] + _nbytes(bucket[-1][1])
        for r in to:
            to_counts[r] += len(bucket)
        stats.tensors += len(bucket)
        sent.extend(name for name, _ in bucket)
        if size <= inline_limit:
            if riding is not None:          # two tiny ones in a row: the first goes alone
                publish({"bytes": 0, "entries": [], "to": riding[0], "fan_out": [], "inline": riding[1]})
            riding = (to, _inline_blob(bucket))
            stats.inline_tensors += len(bucket)
            stats.inline_bytes += riding[1]["bytes"]
            stats.bytes += riding[1]["bytes"]
            continue
        stats.bytes += size
        meta = {"bytes": size, "entries": entries, "to": to, "fan_out": [[h, list(p)] for h, p in fan.items()]}
        if riding is not None and riding[0] == to:
            meta["inline"], riding = riding[1], None
        elif riding is not None:
            publish({"bytes": 0, "entries": [], "to": riding[0], "fan_out": [], "inline": riding[1]})
            riding = None
        slot = None
        if len(bucket) == 1 and _sendable_as_is(bucket[0][1], device):
            flat = bucket[0][1].reshape(-1).view(torch.uint8)     # as is: no copy
        else:
            slot, packed = packed % 2, packed + 1
            if buffer_work[slot] is not None:
                buffer_work[slot].wait()
            if buffers[slot].numel() < size:
                buffers[slot] = torch.empty(max(size, bucket_bytes), dtype=torch.uint8, device=device)
            flat = buffers[slot][:size]
            for (_, t), (_, _, _, off) in zip(bucket, entries):
                flat[off:off + _nbytes(t)].view(t.dtype).view(t.shape).copy_(t)
            stats.copied_bytes += size
        publish(meta)
        while len(in_flight) >= 2:
            in_flight.popleft().wait()
        work = _broadcast_async(bridge.group((stage, *fan))[0], flat)
        stats.sent_bytes += size * len(fan)
        in_flight.append(work)
        if slot is not None:
            buffer_work[slot] = work
        stats.buckets += 1
    if riding is not None:
        publish({"bytes": 0, "entries": [], "to": riding[0], "fan_out": [], "inline": riding[1]})
    while in_flight:
        in_flight.popleft().wait()
    # An end marker closes the stream, so receivers need not poll for the count.
    publish({"end": True, "tensors": to_counts})
    bridge.store.set(_key(version, stage, "count"), str(published - 1))
    stats.seconds = time.perf_counter() - t0
    stats.per_stage_seconds[stage] = stats.seconds
    if index is not None and sorted(e[0] for e in index) != sorted(sent):
        raise RuntimeError(f"weight sync stage {stage} v{version}: announced {len(index)} tensors but sent "
                           f"{len(sent)} (first difference at "
                           f"{next((a for a, b in zip([e[0] for e in index], sent) if a != b), '<end>')!r})")
    return stats


def _inline_blob(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """A tiny bucket as metadata: entries ``[name, shape, dtype, byte offset]`` + base64 bytes."""
    entries, parts, offset = [], [], 0
    for name, t in bucket:
        raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries.append([name, list(t.shape), str(t.dtype), offset])
        pad = _aligned(len(raw)) - len(raw)
        parts.append(raw + bytes(pad))
        offset += len(raw) + pad
    return {"entries": entries, "bytes": offset, "data": base64.b64encode(b"".join(parts)).decode("ascii")}


def _broadcast_async(pg, tensor: torch.Tensor):
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    return pg.broadcast([tensor], opts)


# Kept from one sync to the next (fresh buffers cost a page fault per 4 kB on every sync): the
# sender's two pack buffers and a receiver's pool, per bridge.
_SEND_BUFFERS: "weakref.WeakKeyDictionary[object, list[torch.Tensor]]" = weakref.WeakKeyDictionary()
_RECEIVE_POOLS: "weakref.WeakKeyDictionary[object, list[_BufferPool]]" = weakref.WeakKeyDictionary()


class _BufferPool:
    """Receive buffers (bytes), reused only when no view of them is alive outside the pool."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self.free: list[tuple[torch.Tensor, int]] = []   # (buffer, use count when only we hold it)
        self.allocated = 0

    @staticmethod
    def _uses(buf: torch.Tensor) -> int:
        """Tensors sharing the buffer's storage (views included). Without torch's counter (a
        private API), -1: never equal to the recorded count, so buffers are never reused."""
        count = getattr(torch._C, "_storage_Use_Count", None)
        return count(buf.untyped_storage()._cdata) if count is not None else -1

    def trim(self, nbytes: int) -> None:
        """Forget buffers larger than ``nbytes`` (made for one large tensor) between syncs."""
        self.free = [(b, base) for b, base in self.free if b.numel() <= nbytes]

    def _reuse(self, nbytes: int) -> torch.Tensor | None:
        for k, (buf, base) in enumerate(self.free):
            if buf.numel() >= nbytes and self._uses(buf) == base:
                self.free.append(self.free.pop(k))     # most recently used last
                return buf[:nbytes]
        return None

    def take(self, nbytes: int, hint: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        view = self._reuse(nbytes)
        # gloo's worker thread drops its reference to a finished broadcast's tensor a moment after
        # wait() returns: give it that moment before allocating another buffer
        deadline = time.perf_counter() + 0.005
        while view is None and len(self.free) >= self.keep and time.perf_counter() < deadline:
            time.sleep(0.0002)
            view = self._reuse(nbytes)
        if view is not None:
            return view
        # Forget the oldest buffers beyond `keep`: a loader still holding views frees them later.
        buf = torch.empty(max(nbytes, hint), dtype=torch.uint8, device=device)
        self.allocated += 1
        self.free = self.free[-(self.keep - 1):] if self.keep > 1 else []
        self.free.append((buf, self._uses(buf)))
        return buf[:nbytes]


class WeightStream:
    """What :func:`receive_weights` returns: iterate for ``(hf_name, tensor)`` pairs, bucket by
    bucket. Tensors are views of a receive buffer: a loader may keep them while it needs them (the
    buffer is not reused while they live), but should not keep all of them.

    The training stages this rank needs are received at once, up to ``streams`` of them (a
    :class:`_Lane` each, in stage order), so their buckets come in interleaved: in stage order
    within a stage, in arrival order across stages."""

    def __init__(self, bridge: BridgeGroup, version: int, stats: SyncStats, bucket_hint: int = 0,
                 holds: HeldWeights | None = None, streams: int = 8) -> None:
        if streams < 1:
            raise ValueError(f"weight sync streams: got {streams}, expected an integer >= 1")
        self.bridge, self.version, self.stats = bridge, version, stats
        self.holds, self.streams = holds, streams
        # the senders route by it (what it holds, its node) and check the transport; they wait for
        # every receiver's answer
        bridge.store.set(_key(version, "holds", bridge.rank), json.dumps({
            "holds": None if holds is None else asdict(holds), "node": bridge.node, "transport": bridge.backend}))
        self._pools = _RECEIVE_POOLS.setdefault(bridge, [])     # one per lane slot, kept between syncs
        self._hint = bucket_hint
        self._gen: Iterator | None = None
        self._announced: dict[int, list | None] = {}
        self.finished = False

    # -- metadata ---------------------------------------------------------------------------
    def _stage_index(self, stage: int) -> list | None:
        if stage not in self._announced:
            head = json.loads(self.bridge.store.get(_key(self.version, stage, "index")))
            self._hint = max(self._hint, head["bucket_bytes"])   # one buffer size fits every bucket
            self._announced[stage] = head["tensors"]
        return self._announced[stage]

    def announced(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """Every (name, shape) this sync will bring, when every stage's sender announced it up
        front; None when any stage streams a generator (check its names as they come)."""
        out = []
        for stage in range(self.bridge.num_stages):
            index = self._stage_index(stage)
            if index is None:
                return None
            out.extend((name, tuple(shape)) for name, shape, _ in index
                       if self.holds is None or self.holds.holds(name))
        return out

    # -- data -------------------------------------------------------------------------------
    def buckets(self) -> Iterator[tuple[list[tuple[str, tuple[int, ...]]], Iterator[tuple[str, torch.Tensor]]]]:
        """``(entries, tensors)`` per bucket: its (name, shape) list, read from the store before
        the tensors are used, then an iterator over its tensors. Every bucket's tensors must be
        iterated (or the stream drained) before asking for the next bucket."""
        if self._gen is not None:
            raise RuntimeError("a WeightStream is read once")
        self._gen = self._receive()
        return self._gen

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for _, tensors in self.buckets():
            yield from tensors

    def drain(self) -> None:
        """Receive whatever is left without using it, so the senders' broadcasts complete."""
        gen = self._gen if self._gen is not None else self.buckets()
        for _, tensors in gen:
            for _ in tensors:
                pass

    def _mine(self, stage: int, store):
        """This rank's bucket metadata of `stage`, in order; then the end marker."""
        i = 0
        while True:
            meta = json.loads(store.get(_key(self.version, stage, i)))
            if meta.get("end") or self.bridge.rank in meta["to"]:
                yield meta
                if meta.get("end"):
                    return
            i += 1

    def _needed(self) -> list[int]:
        """The stages to receive: all but those whose announced index holds nothing of ours (a vLLM
        PP rank starts on the training stages that hold its layers at once)."""
        needed = []
        for stage in range(self.bridge.num_stages):
            index = self._stage_index(stage)
            if index is not None and self.holds is not None and not any(self.holds.holds(n) for n, _, _ in index):
                self.stats.per_stage_seconds[stage] = 0.0
            else:
                needed.append(stage)
        return needed

    def _receive(self):
        stats, bridge = self.stats, self.bridge
        t0 = time.perf_counter()
        for stage in range(bridge.num_stages):           # every receiver joins every stage's group first
            bridge.stage_group(stage)                    # (their senders wait), so none waits on another
        waiting = deque(self._needed())
        allocated_before = sum(p.allocated for p in self._pools)
        device = bridge.device          # here: a new thread's current CUDA device is GPU 0
        arrivals: queue.Queue = queue.Queue()
        running: dict[int, _Lane] = {}                   # lane slot -> lane
        arrived: dict[int, int] = {}

        def start_next() -> None:
            # In stage order: every receiver of a stage starts it once its earlier stages are done,
            # so no two receivers wait on each other.
            slot = min(set(range(self.streams)) - set(running))
            while len(self._pools) <= slot:
                self._pools.append(_BufferPool())
            stage = waiting.popleft()
            arrived[stage] = 0
            running[slot] = _Lane(self, stage, slot, self._pools[slot], arrivals, device)
            running[slot].start()

        while waiting and len(running) < self.streams:
            start_next()
        while running:
            lane, meta, flat, error = arrivals.get()
            if error is not None:
                raise RuntimeError(f"weight sync v{self.version} stage {lane.stage}: receiving failed: "
                                   f"{type(error).__name__}: {error}") from error
            if meta.get("end"):
                sent = meta["tensors"].get(str(bridge.rank))
                if sent != arrived[lane.stage]:
                    raise RuntimeError(f"weight sync v{self.version} stage {lane.stage}: the sender sent this rank "
                                       f"{sent} tensors, {arrived[lane.stage]} arrived")
                stats.per_stage_seconds[lane.stage] = time.perf_counter() - t0
                stats.relayed_bytes += lane.relayed_bytes
                del running[lane.slot]
                if waiting:
                    start_next()
                continue
            inline = meta.get("inline") or {"entries": []}
            entries = [(name, tuple(shape)) for name, shape, _, _ in inline["entries"] + meta["entries"]]
            yield entries, self._views(flat, meta)
            lane.room.release()                          # the loader moved on: the lane may receive one more
            stats.buckets += 1 if meta["bytes"] else 0
            stats.bytes += meta["bytes"] + inline.get("bytes", 0)
            stats.inline_bytes += inline.get("bytes", 0)
            arrived[lane.stage] += len(entries)
        stats.seconds = time.perf_counter() - t0
        stats.buffers_allocated = sum(p.allocated for p in self._pools) - allocated_before
        if self._hint:
            for pool in self._pools:
                pool.trim(self._hint)
        self.finished = True

    def _views(self, flat: torch.Tensor | None, meta: dict) -> Iterator[tuple[str, torch.Tensor]]:
        """The bucket's tensors (those carried in its metadata first: they came first)."""
        inline = meta.get("inline")
        sources = []
        if inline:
            # a fresh (aligned) tensor on the bridge's device, like the received buckets
            raw = torch.frombuffer(bytearray(base64.b64decode(inline["data"])), dtype=torch.uint8).to(
                self.bridge.device, copy=True)
            self.stats.inline_tensors += len(inline["entries"])
            sources.append((raw, inline["entries"]))
        if flat is not None:
            sources.append((flat, meta["entries"]))
        for flat, es in sources:
            for name, shape, dtype, off in es:
                dt = _DTYPES[dtype]
                n = 1
                for d in shape:
                    n *= d
                self.stats.tensors += 1
                yield name, flat[off:off + n * _ITEMSIZE[dt]].view(dt).view(shape)


class _Lane(threading.Thread):
    """One training stage's stream at one receiver, in a thread of its own: receives each bucket
    (a node head from the stage leader, then relayed on to its node; the others from their head),
    at most ``depth`` buckets ahead of the loader, and hands them to the stream's ``arrivals``.

    It has its own store client (a blocking get holds its client's lock, which would stall the
    other lanes), its own buffer pool, and its own relay groups (tagged by stage: two stages with
    the same head and peers must not share a group, whose broadcasts would then interleave in a
    different order on different ranks). The end marker (or an error) is handed on last."""

    def __init__(self, stream: WeightStream, stage: int, slot: int, pool: _BufferPool, arrivals: queue.Queue,
                 device: torch.device, depth: int = 2) -> None:
        super().__init__(name=f"weight-sync-v{stream.version}-s{stage}", daemon=True)
        self.stream, self.stage, self.slot, self.pool, self.arrivals = stream, stage, slot, pool, arrivals
        self.device = device
        self.room = threading.Semaphore(depth)
        self.relays: deque = deque()        # this head's broadcasts to its node, in flight
        self.relayed_bytes = 0
        self.store = None                   # its own client, made in its thread

    def run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.store = self.stream.bridge.store.clone()
            for meta in self.stream._mine(self.stage, self.store):
                if meta.get("end"):
                    self._settle(keep=0)
                    self.arrivals.put((self, meta, None, None))
                    return
                self.room.acquire()
                self.arrivals.put((self, meta, self._receive(meta), None))
        except BaseException as e:          # the stream raises it where the loader reads
            self.arrivals.put((self, None, None, e))

    def _receive(self, meta: dict) -> torch.Tensor | None:
        self._settle(keep=1)
        if not meta["bytes"]:                           # only tensors carried in the metadata
            return None
        bridge, me = self.stream.bridge, self.stream.bridge.rank
        fan = {h: tuple(p) for h, p in meta["fan_out"]}
        flat = self.pool.take(meta["bytes"], self.stream._hint, self.device)
        if me in fan:
            _broadcast_async(bridge.group((self.stage, *fan), store=self.store)[0], flat).wait()
            if fan[me]:
                self.relays.append(_broadcast_async(bridge.group((me, *fan[me]), self.stage, self.store)[0], flat))
                self.relayed_bytes += flat.numel() * len(fan[me])
        else:
            head = next(h for h, peers in fan.items() if me in peers)
            _broadcast_async(bridge.group((head, *fan[head]), self.stage, self.store)[0], flat).wait()
        return flat

    def _settle(self, keep: int) -> None:
        """Wait for this head's relays until ``keep`` are left in flight (each holds a receive
        buffer: they are part of the lane's two or three)."""
        while len(self.relays) > keep:
            self.relays.popleft().wait()


def receive_weights(bridge: BridgeGroup, *, version: int, stats: SyncStats | None = None,
                    bucket_bytes: int = 0, holds: HeldWeights | None = None, streams: int = 8) -> WeightStream:
    """Called by every inference rank: the :class:`WeightStream` of weights version ``version``.
    Nothing is received until it is iterated. Receive buffers are sized to the sender's bucket size
    (announced per stage) or ``bucket_bytes`` if larger. ``streams``: training stages received at
    once (each holds two or three buffers of a bucket's size)."""
    return WeightStream(bridge, version, stats if stats is not None else SyncStats(), bucket_bytes, holds, streams)
