"""The one interface the RL step loop uses to generate: :class:`InferenceEngine`.

An engine holds one policy model, turns token-id prompts into sampled completions, and takes new
weights in place between rollouts::

    engine = make_engine("vllm", "/ckpt/hf", tp=8, seed=1)        # or "transformers"
    outs = engine.generate(prompts, n=8, sampling=SamplingSettings(temperature=1.0,
                                                                   max_new_tokens=1024))
    engine.update_weights(iter_hf_weights(model, hf_config))      # HF names, full tensors
    engine.close()

The backend is chosen once, here, from the config (``groups.inference.engine``); nothing after
construction asks which one it is. Both backends promise the same things:

- ``generate`` returns ``len(prompts) * n`` :class:`Completion` objects ordered by
  ``(prompt_index, sample_index)``;
- ``Completion.logprobs[i]`` is the log-probability of ``token_ids[i]`` under the distribution it
  was sampled from: ``log_softmax(logits / temperature)`` after top-p truncation (renormalised
  over the nucleus). With ``top_p=1`` this is exactly what the trainer computes from its own
  logits; with ``temperature=0`` (greedy) it is ``log_softmax(logits)``;
- a stop token, when generated, is the last entry of ``token_ids`` and ``finish_reason`` is
  ``"stop"``; otherwise ``"length"``;
- the same ``seed`` gives the same completions on the same engine and weights;
- ``update_weights`` takes the whole model under Hugging Face parameter names
  (``model.layers.0.self_attn.q_proj.weight``), full (unsharded) tensors, in one call (an
  iterator is fine: the trainer streams buckets), and takes effect for the next ``generate``
  (cached prefixes are dropped). It streams: tensors go to the model as they arrive, so the
  extra memory of an update is two or three bridge buckets whatever the model size. Every name and
  shape is checked against the checkpoint the engine was built from (:class:`CheckedWeights`):
  when the whole update is known up front (a list or dict, or a bridge stream whose senders
  announced their index) before loading any of it, so :class:`WeightUpdateError` names the first
  mismatch and the old weights stay; otherwise each bucket's names and shapes before its
  tensors, and the missing names at the end. A problem found after part of the update was
  loaded still raises, and the engine then holds a mix of old and new weights: it sets
  ``weights_incomplete`` and its ``generate`` refuses until a complete update succeeds.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "ENGINE_KINDS",
    "Completion",
    "InferenceEngine",
    "SamplingSettings",
    "CheckedWeights",
    "WeightUpdateError",
    "check_weights",
    "make_engine",
    "read_weight_shapes",
]

ENGINE_KINDS = ("vllm", "transformers")
FinishReason = Literal["stop", "length"]


@dataclass(kw_only=True, slots=True, frozen=True)
class SamplingSettings:
    """How to sample. ``temperature=0`` is greedy. ``stop_token_ids=None`` means the model's eos."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = 0
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingSettings.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(kw_only=True, slots=True)
class Completion:
    """One sampled continuation of ``prompts[prompt_index]`` (its ``sample_index``-th of ``n``)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str | None = field(default=None)


class WeightUpdateError(ValueError):
    """``update_weights`` got a name the model does not have, or a tensor of the wrong shape."""


class InferenceEngine(abc.ABC):
    """A policy model that samples completions and takes new weights in place."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], n: int = 1,
                 sampling: SamplingSettings | None = None) -> list[Completion]:
        """Sample ``n`` completions for each token-id prompt; ordered by (prompt, sample)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (HF names, full tensors); returns how many tensors were loaded."""

    def held_weights(self):
        """The :class:`tulu.dist.weight_sync.HeldWeights` this rank holds, for a routed weight sync
        (``receive_weights(..., holds=engine.held_weights())``); None: the whole model."""
        return None

    #: Why the engine's weights are a mix of two versions (an update that failed after loading
    #: part of itself), or None. ``generate`` refuses while it is set; a complete update clears it.
    weights_incomplete: str | None = None

    def _require_complete_weights(self) -> None:
        if self.weights_incomplete is not None:
            raise WeightUpdateError(
                f"{type(self).__name__}: refusing to generate with partially updated weights; "
                f"update_weights with the whole model first. The failed update: {self.weights_incomplete}")

    def _start_generate(self, prompts: list[list[int]], n: int,
                        sampling: SamplingSettings | None) -> SamplingSettings:
        """What every ``generate`` checks first (complete weights, ``n >= 1``, no empty prompt);
        returns the sampling settings to use."""
        self._require_complete_weights()
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        return sampling or SamplingSettings()

    def _load_streamed(self, checked: CheckedWeights, load: Callable[[Iterable], object]) -> int:
        """Run ``load`` over the checked stream; record or clear :attr:`weights_incomplete`."""
        checked.precheck()                 # a whole-update problem: raised, old weights intact
        try:
            load(checked)
        except BaseException as err:
            if checked.loaded:
                self.weights_incomplete = (f"loading failed after {checked.loaded} tensors of an "
                                           f"update: {type(err).__name__}: {err}")
            raise
        try:
            loaded = checked.finish()
        except WeightUpdateError as err:
            if checked.loaded:
                self.weights_incomplete = str(err)
            raise
        self.weights_incomplete = None
        return loaded

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model (and, for vLLM, its process group state). Idempotent."""

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape in a Hugging Face checkpoint folder's ``*.safetensors`` files.

    Reads only the headers. These are the names ``update_weights`` accepts.
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {model_dir}: the inference engines load a Hugging Face "
            "checkpoint folder saved with save_pretrained(safe_serialization=True)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                shapes[name] = tuple(sf.get_slice(name).get_shape())
    return shapes


class CheckedWeights:
    """A weight update checked against the model's names and shapes as it streams.

    Iterate it to get the ``(name, tensor)`` pairs to load; nothing is kept, so loading tensor by
    tensor (or bucket by bucket, for a :class:`tulu.dist.weight_sync.WeightStream`) holds one bucket at
    a time whatever the model size. Checks, each before the tensors concerned are handed out:

    - :meth:`precheck`, before anything is loaded: the whole update when it is known up front (a
      list/tuple/dict already in memory, or a stream whose senders announced their index):
      unknown names, wrong shapes, duplicates and missing names;
    - per bucket, from its names and shapes, before any of its tensors: unknown names, wrong
      shapes, duplicates (a plain iterator: per tensor);
    - at the end: every expected name came (except ``optional`` ones, e.g. a tied
      ``lm_head.weight``).

    A problem found while streaming ends the iteration early (the rest of a bridge stream is
    received and dropped, so the senders finish) and is kept in :attr:`error`; :attr:`loaded`
    says how many tensors were handed out before it. The engine then raises it (``finish``).
    """

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping,
                 expected: Mapping[str, tuple[int, ...]], *, where: str, optional: Iterable[str] = ()):
        self.source = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        held = getattr(self.source, "holds", None)     # a routed bridge stream brings only these
        if held is not None:
            expected = {n: s for n, s in expected.items() if held.holds(n)}
            optional = [n for n in optional if held.holds(n)]
        self.expected, self.where, self.optional = expected, where, set(optional)
        self.seen: set[str] = set()
        self.loaded = 0
        self.error: WeightUpdateError | None = None
        self._prechecked = False

    # -- the checks -------------------------------------------------------------------------
    def _check_entries(self, entries: Iterable[tuple[str, tuple[int, ...]]], seen: set[str]) -> None:
        expected = self.expected
        for name, shape in entries:
            if name not in expected and name not in self.optional:
                close = [n for n in expected if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
                hint = f"; names with the same ending: {close}" if close else ""
                raise WeightUpdateError(
                    f"{self.where}: update_weights got unknown parameter {name!r} (expected Hugging "
                    f"Face names such as {next(iter(expected))!r}; the model has {len(expected)}){hint}")
            if name in expected and tuple(shape) != tuple(expected[name]):
                raise WeightUpdateError(
                    f"{self.where}: update_weights got {name!r} with shape {tuple(shape)}, but the "
                    f"model's is {tuple(expected[name])} (send full, unsharded tensors)")
            if name in seen:
                raise WeightUpdateError(f"{self.where}: update_weights got {name!r} twice")
            seen.add(name)

    def _check_complete(self, seen: set[str]) -> None:
        missing = [n for n in self.expected if n not in seen]
        if missing:
            raise WeightUpdateError(
                f"{self.where}: update_weights got {len(seen)} tensors but not {missing[0]!r} "
                f"({len(missing)} of the model's {len(self.expected)} missing); send the whole model "
                "in one call (a partially updated fused layer would hold garbage in vLLM)")

    def _announced(self) -> list[tuple[str, tuple[int, ...]]] | None:
        src = self.source
        if hasattr(src, "announced"):                      # a bridge WeightStream
            return src.announced()
        if hasattr(src, "__len__") and not hasattr(src, "__next__"):   # already in memory
            return [(name, tuple(t.shape)) for name, t in src]
        return None

    def precheck(self) -> None:
        """Check the whole update before anything is loaded, when it is known up front; raises
        :class:`WeightUpdateError` (after draining a bridge stream), the old weights intact."""
        self._prechecked = True
        index = self._announced()
        if index is None:
            return
        try:
            seen: set[str] = set()
            self._check_entries(index, seen)
            self._check_complete(seen)
        except WeightUpdateError:
            self._drain()
            raise

    # -- the stream -------------------------------------------------------------------------
    def _buckets(self):
        src = self.source
        if hasattr(src, "buckets"):
            yield from src.buckets()
        else:
            for name, t in src:
                yield [(name, tuple(t.shape))], iter(((name, t),))

    def _drain(self) -> None:
        if hasattr(self.source, "drain"):
            self.source.drain()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self._prechecked:
            self.precheck()
        try:
            for entries, tensors in self._buckets():
                self._check_entries(entries, self.seen)
                for name, tensor in tensors:
                    self.loaded += 1
                    yield name, tensor
            self._check_complete(self.seen)
        except WeightUpdateError as err:
            self.error = err
            self._drain()

    def finish(self) -> int:
        """Raise the problem the stream had, if any (saying what the engine now holds); else
        return how many tensors were loaded."""
        if self.error is not None:
            if self.loaded:
                raise WeightUpdateError(
                    f"{self.error} -- found after {self.loaded} tensors of this update were loaded: "
                    "the engine now holds a mix of old and new weights and refuses to generate "
                    "until a complete update_weights succeeds") from None
            raise self.error
        return self.loaded


def check_weights(named_tensors: Iterable[tuple[str, torch.Tensor]],
                  expected: Mapping[str, tuple[int, ...]], *, where: str,
                  optional: Iterable[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """Read the whole stream, check it is exactly the model's weights, return it as a list.

    Holds every tensor: for small models and tests. Engines stream with :class:`CheckedWeights`.
    The first problem raises :class:`WeightUpdateError` naming the tensor.
    """
    checked = CheckedWeights(named_tensors, expected, where=where, optional=optional)
    weights = list(checked)
    if checked.error is not None:
        raise checked.error
    return weights


def make_engine(kind: str, model_dir: str | Path, *, tp: int = 1, pp: int = 1,
                gpu_memory_utilization: float | None = None, max_model_len: int = 4096,
                seed: int = 0, dtype: str = "auto", **kwargs) -> InferenceEngine:
    """Build the inference engine named by the config (``"vllm"`` or ``"transformers"``).

    ``model_dir`` is a Hugging Face checkpoint folder (config, safetensors, tokenizer). For vLLM
    with ``tp * pp > 1`` the caller has already set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT for the inference role's own world (not the training role's). ``gpu_memory_
    utilization=None`` picks 0.9 on a GPU and 0.2 on CPU. Extra keyword arguments go to the
    backend (e.g. ``enforce_eager``, ``device``).
    """
    if kind == "transformers":
        if tp != 1 or pp != 1:
            raise ValueError(
                f"the transformers engine runs on one device; got tp={tp}, pp={pp} "
                "(set groups.inference.engine: vllm for a parallel inference group)")
        from tulu.inference.hf_engine import TransformersEngine

        return TransformersEngine(model_dir, seed=seed, dtype=dtype, **kwargs)
    if kind == "vllm":
        from tulu.inference.vllm_engine import VllmEngine

        return VllmEngine(model_dir, tp=tp, pp=pp, gpu_memory_utilization=gpu_memory_utilization,
                          max_model_len=max_model_len, seed=seed, dtype=dtype, **kwargs)
    raise ValueError(
        f"unknown inference engine {kind!r} (groups.inference.engine); valid: {', '.join(ENGINE_KINDS)}")
