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
reload keeps a layer's tensors until the layer is complete), so a receiver holds the bucket
being received, the bucket being loaded, and whatever its loader still keeps: two or three
buffers of a bucket's size (or of the largest tensor, when one is larger; those are dropped after
the sync) whatever the model size. The bucket-sized buffers stay allocated between syncs.

Routing: each receiver says what it holds (``receive_weights(..., holds=engine.held_weights())``,
a :class:`HeldWeights`: a vLLM pipeline stage's layers, embedding, head; None = everything) and
on which node it runs (``BridgeGroup(node=...)``). A tensor goes only to the receivers that hold
it, and once per node: the leader broadcasts the bucket to the first of them on each node (its
*head*), which broadcasts it on to the others of its node (:func:`_fan_out`); buckets never mix
destinations. ``SyncStats.sent_bytes`` counts the leader's bytes x receiving nodes,
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
broadcasts in flight at most). Receivers post the broadcast of bucket i+1 before their loader
consumes bucket i. A bucket of 64 kB or less (or a 64th of the bucket size: norms, biases) is not
broadcast: its bytes ride in the next bucket's metadata in the store (base64), or alone there when
it is the last or the next bucket goes elsewhere (``SyncStats.inline_tensors``); a per-bucket
broadcast + store round trip cost more than the bytes.
"""

from __future__ import annotations

import base64
import json
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


def _fan_out(to: tuple[int, ...], node_of: Mapping[int, object]) -> dict[int, tuple[int, ...]]:
    """{node head: the other receivers of ``to`` on its node}: the head is the first receiver of
    ``to`` on each node; it takes the bucket from the sender and re-broadcasts it on its node."""
    out: dict[int, list[int]] = {}
    head_of: dict[object, int] = {}
    for r in to:
        node = node_of[r]
        if node in head_of:
            out[head_of[node]].append(r)
        else:
            head_of[node] = r
            out[r] = []
    return {h: tuple(p) for h, p in out.items()}


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
        fan = _fan_out(to, node_of)
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
_RECEIVE_POOLS: "weakref.WeakKeyDictionary[object, _BufferPool]" = weakref.WeakKeyDictionary()


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
    """What :func:`receive_weights` returns: iterate for ``(hf_name, tensor)`` pairs, stage by
    stage, bucket by bucket. Tensors are views of a receive buffer: a loader may keep them while
    it needs them (the buffer is not reused while they live), but should not keep all of them."""

    def __init__(self, bridge: BridgeGroup, version: int, stats: SyncStats, bucket_hint: int = 0,
                 holds: HeldWeights | None = None) -> None:
        self.bridge, self.version, self.stats = bridge, version, stats
        self.holds = holds
        # the senders route by it (what it holds, its node) and check the transport; they wait for
        # every receiver's answer
        bridge.store.set(_key(version, "holds", bridge.rank), json.dumps({
            "holds": None if holds is None else asdict(holds), "node": bridge.node, "transport": bridge.backend}))
        self._relays: deque = deque()       # a node head's broadcasts to its node, in flight
        self._pool = _RECEIVE_POOLS.setdefault(bridge, _BufferPool())
        self._allocated_before = self._pool.allocated
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

    def _mine(self, stage: int):
        """This rank's bucket metadata of `stage`, in order; then the end marker."""
        i = 0
        while True:
            meta = json.loads(self.bridge.store.get(_key(self.version, stage, i)))
            if meta.get("end") or self.bridge.rank in meta["to"]:
                yield meta
                if meta.get("end"):
                    return
            i += 1

    def _receive(self):
        stats, bridge = self.stats, self.bridge
        t0 = time.perf_counter()
        for stage in range(bridge.num_stages):           # every receiver joins every stage's group first
            bridge.stage_group(stage)                    # (their senders wait), so none waits on another
        for stage in range(bridge.num_stages):
            index = self._stage_index(stage)
            if index is not None and self.holds is not None and not any(self.holds.holds(n) for n, _, _ in index):
                # announced, and none of it is ours: no need to wait for this stage's end (a
                # vLLM PP rank starts on the training stages that hold its layers at once)
                stats.per_stage_seconds[stage] = 0.0
                continue
            receivers = tuple(range(bridge.num_stages, bridge.size))
            mine = self._mine(stage)
            arrived = 0
            meta = next(mine)
            pending = None if meta.get("end") else self._post(stage, receivers, meta)
            while pending is not None:
                meta, work, flat = pending
                posted: list = []

                def post_next(posted=posted, stage=stage, receivers=receivers, mine=mine):
                    if not posted:
                        nxt = next(mine)
                        posted.append(nxt if nxt.get("end") else self._post(stage, receivers, nxt))

                inline = meta.get("inline") or {"entries": []}
                entries = [(name, tuple(shape)) for name, shape, _, _ in inline["entries"] + meta["entries"]]
                yield entries, self._views(work, flat, meta, post_next)
                work.wait()          # (a loader that left the bucket unread: the bytes still land)
                post_next()
                stats.buckets += 1 if meta["bytes"] else 0
                stats.bytes += meta["bytes"] + inline.get("bytes", 0)
                stats.inline_bytes += inline.get("bytes", 0)
                arrived += len(entries)
                pending, work, flat = posted[0], None, None
                if isinstance(pending, dict):            # the end marker
                    meta, pending = pending, None
            self._settle_relays(keep=0)
            sent = meta["tensors"].get(str(bridge.rank))
            if sent != arrived:
                raise RuntimeError(f"weight sync v{self.version} stage {stage}: the sender sent this rank "
                                   f"{sent} tensors, {arrived} arrived")
            stats.per_stage_seconds[stage] = time.perf_counter() - t0
        stats.seconds = time.perf_counter() - t0
        stats.buffers_allocated = self._pool.allocated - self._allocated_before
        if self._hint:
            self._pool.trim(self._hint)
        self.finished = True

    def _post(self, stage: int, receivers: tuple[int, ...], meta: dict):
        """Post the receive of a bucket: from the stage leader (a node head) or from this node's
        head (the others of a node). A head passes each bucket on once it has arrived."""
        self._settle_relays(keep=1)
        bridge, me = self.bridge, self.bridge.rank
        if not meta["bytes"]:                            # only tensors carried in the metadata
            return meta, _NOTHING, None
        fan = {h: tuple(p) for h, p in meta["fan_out"]}
        flat = self._pool.take(meta["bytes"], self._hint, bridge.device)
        if me in fan:
            work = _broadcast_async(bridge.group((stage, *fan))[0], flat)
            if fan[me]:
                work = _Relay(work, bridge.group((me, *fan[me]))[0], flat, self, len(fan[me]))
        else:
            head = next(h for h, peers in fan.items() if me in peers)
            work = _broadcast_async(bridge.group((head, *fan[head]))[0], flat)
        return meta, work, flat

    def _settle_relays(self, keep: int) -> None:
        """Wait for this head's broadcasts to its node until ``keep`` are left in flight (each holds
        a receive buffer: they are part of the two or three)."""
        while len(self._relays) > keep:
            self._relays.popleft().wait()

    def _views(self, work, flat: torch.Tensor | None, meta: dict, post_next) -> Iterator[tuple[str, torch.Tensor]]:
        """The bucket's tensors (those carried in its metadata first: they came first). The next
        bucket's broadcast is posted once the loader asks for the second tensor (or leaves the
        bucket): by then it holds no view of the bucket before."""
        work.wait()
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
        listed = [(buf, e) for buf, es in sources for e in es]
        for k, (flat, (name, shape, dtype, off)) in enumerate(listed):
            if k == 1:
                post_next()
            dt = _DTYPES[dtype]
            n = 1
            for d in shape:
                n *= d
            self.stats.tensors += 1
            yield name, flat[off:off + n * _ITEMSIZE[dt]].view(dt).view(shape)


class _Nothing:
    def wait(self) -> None:
        pass


_NOTHING = _Nothing()


class _Relay:
    """A node head's receive: once the bucket has arrived from the sender, it is broadcast on to
    the head's node (the head's wait() returns then; the relay completes in the background)."""

    def __init__(self, first, pg, flat: torch.Tensor, stream: "WeightStream", peers: int) -> None:
        self.first, self.pg, self.flat, self.stream, self.peers = first, pg, flat, stream, peers

    def wait(self) -> None:
        if self.first is None:
            return
        self.first.wait()
        self.first = None
        self.stream._relays.append(_broadcast_async(self.pg, self.flat))
        self.stream.stats.relayed_bytes += self.flat.numel() * self.peers
        self.flat = None


def receive_weights(bridge: BridgeGroup, *, version: int, stats: SyncStats | None = None,
                    bucket_bytes: int = 0, holds: HeldWeights | None = None) -> WeightStream:
    """Called by every inference rank: the :class:`WeightStream` of weights version ``version``.
    Nothing is received until it is iterated. Receive buffers are sized to the sender's bucket size
    (announced per stage) or ``bucket_bytes`` if larger."""
    return WeightStream(bridge, version, stats if stats is not None else SyncStats(), bucket_bytes, holds)
