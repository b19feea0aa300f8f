"""The transformers inference engine: tiny runs on CPU, and the oracle the vLLM engine is tested
against.

Sampling is a plain decode loop over a left-padded batch with a KV cache, so every number it
returns is easy to check: at each step the logits of the last position (float32) are divided by
the temperature, truncated to the top-p nucleus, and ``log_softmax``-ed; the token is drawn from
that distribution by inverting its CDF at one uniform number per row and step, a hash of
``(seed, prompt_index, sample_index, step)``, so a completion does not depend on how rows were
batched, and the whole batch samples in a few tensor ops on the model's device (a generator per
row, drawing a vocabulary-sized noise vector on the CPU at every step, made generation on a GPU
~15x slower than ``model.generate``). The ``n`` samples of a prompt share one prefill: the
prompt's KV cache is computed once and copied to its rows. See :mod:`tulu.inference.engine` for
the promises every engine keeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from tulu.inference.engine import (
    Completion,
    InferenceEngine,
    SamplingSettings,
    CheckedWeights,
    read_weight_shapes,
)

__all__ = ["TransformersEngine", "sample_step"]


def row_uniforms(seed: int, rows: list[tuple[int, int]], step: int) -> list[float]:
    """One number in [0, 1) per (prompt_index, sample_index) row for decode step ``step``: a
    hash, so a row's stream depends on nothing but its own indices (53 random bits each)."""
    out = []
    for i, j in rows:
        digest = hashlib.blake2b(f"{seed}/{i}/{j}/{step}".encode(), digest_size=8).digest()
        out.append((int.from_bytes(digest, "little") >> 11) * 2.0 ** -53)
    return out


def sample_step(logits: torch.Tensor, sampling: SamplingSettings,
                uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row of ``logits`` ([B, V]); return (tokens, their logprobs).

    Greedy (temperature 0): argmax, logprob under ``log_softmax(logits)``. Otherwise the
    logprob is under the distribution sampled from: ``logits / T``, top-p truncated, renormalised;
    the token is the first whose cumulative probability exceeds ``uniforms[b]`` ([B] in [0, 1),
    float64; None: fresh random numbers). Tokens of probability 0 are never picked.
    """
    logits = logits.float()
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = logits.log_softmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - sampling.top_p
        drop[:, -1] = False                          # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    logprobs = logits.log_softmax(dim=-1)
    # Inverse CDF in float64: the cumulative sum's rounding stays far below one token's mass.
    cdf = logprobs.double().exp().cumsum(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], dtype=torch.float64, device=cdf.device)
    # scaled by the row's total (1 up to rounding): the target is always below the last entry;
    # right-side search skips tokens of probability 0 (their entry equals their predecessor's)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class TransformersEngine(InferenceEngine):
    """A Hugging Face causal LM on one device, sampling with a hand-written decode loop.

    ``max_batch_size`` bounds how many (prompt, sample) rows decode together; ``device=None``
    means CUDA when there is one, else CPU. ``fast_llama`` decodes plain Llama models with
    :class:`tulu.inference.llama_decoder.LlamaDecoder` instead of the transformers forward (same
    parameters, same logits up to float rounding, fewer ops per token).
    """

    def __init__(self, model_dir: str | Path, *, seed: int = 0, dtype: str = "auto",
                 device: str | torch.device | None = None, max_batch_size: int = 64,
                 load_tokenizer: bool = True, fast_llama: bool = True) -> None:
        from transformers import AutoModelForCausalLM

        from tulu.inference.llama_decoder import make_decoder

        self.model_dir = str(model_dir)
        self.seed = seed
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_size = max_batch_size
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.decoder = make_decoder(self.model, fast=fast_llama)
        self.reference = None  # load_reference: RLVR's frozen KL reference
        self._params = self.model.state_dict(keep_vars=True)
        self._shapes = read_weight_shapes(self.model_dir)
        self._optional = (("lm_head.weight",) if self.model.config.tie_word_embeddings
                          and "lm_head.weight" not in self._shapes else ())
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos if isinstance(eos, list) else
                                                    ([] if eos is None else [eos]))
        pad = self.model.config.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        self.tokenizer = None
        if load_tokenizer and (Path(self.model_dir) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)

    # -- generate ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int = 1,
                 sampling: SamplingSettings | None = None) -> list[Completion]:
        sampling = self._start_generate(prompts, n, sampling)
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        out: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            out.extend(self._generate_rows(prompts, rows[start:start + self.max_batch_size],
                                           sampling))
        return out

    @torch.inference_mode()
    def _generate_rows(self, prompts: list[list[int]], rows: list[tuple[int, int]],
                       sampling: SamplingSettings) -> list[Completion]:
        stop = set(sampling.stop_token_ids if sampling.stop_token_ids is not None
                   else self.eos_token_ids)
        batch = len(rows)
        # One prefill per distinct prompt; its KV cache is then copied to each of its rows.
        distinct = list(dict.fromkeys(i for i, _ in rows))
        width = max(len(prompts[i]) for i in distinct)
        ids = torch.full((len(distinct), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for r, i in enumerate(distinct):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seeded = not sampling.greedy and sampling.seed is not None

        decoder = self.decoder
        logits = decoder.prefill(ids, mask, positions, sampling.max_new_tokens)
        if len(distinct) < batch:
            where = {i: r for r, i in enumerate(distinct)}
            index = torch.tensor([where[i] for i, _ in rows], device=self.device)
            decoder.expand(index)
            logits, positions = logits[index], positions[index]
        tokens_out: list[list[int]] = [[] for _ in rows]
        logprobs_out: list[list[float]] = [[] for _ in rows]
        finished = [False] * batch
        step_pos = positions[:, -1:]
        for step in range(sampling.max_new_tokens):
            if step:
                logits = decoder.step(step_ids, step_pos)
            uniforms = torch.tensor(row_uniforms(sampling.seed, rows, step), dtype=torch.float64) \
                if seeded else None
            tokens, lps = sample_step(logits, sampling, uniforms)
            tokens_l, lps_l = tokens.tolist(), lps.tolist()
            for r in range(batch):
                if finished[r]:
                    continue
                tokens_out[r].append(tokens_l[r])
                logprobs_out[r].append(lps_l[r])
                finished[r] = tokens_l[r] in stop
            if all(finished):
                break
            step_ids = tokens.where(~torch.tensor(finished, device=self.device),
                                    self.pad_token_id)[:, None]
            step_pos = step_pos + 1

        return [
            Completion(prompt_index=i, sample_index=j, token_ids=tokens_out[r],
                       logprobs=logprobs_out[r],
                       finish_reason="stop" if finished[r] else "length",
                       text=self._decode(tokens_out[r]))
            for r, (i, j) in enumerate(rows)
        ]

    def _decode(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        # Tensor by tensor, as they arrive (see the engine contract for what a bad stream leaves).
        checked = CheckedWeights(named_tensors, self._shapes, optional=self._optional,
                                 where=f"transformers engine ({self.model_dir})")

        def load(weights) -> None:
            try:
                for name, tensor in weights:
                    self._params[name].copy_(tensor)
            finally:
                self.decoder.refresh()

        return self._load_streamed(checked, load)

    # -- reference log-probs ----------------------------------------------------------------
    @torch.no_grad()
    def load_reference(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Keep a frozen copy of the model with these weights (RLVR's KL reference), for
        :meth:`reference_logprobs`. Plain Llama models only (the fast decoder's forward)."""
        import copy

        from tulu.inference.llama_decoder import LlamaDecoder

        if not LlamaDecoder.supports(self.model.config):
            raise ValueError(f"reference log-probs in the engine need a plain Llama model; {self.model_dir} is "
                             f"{self.model.config.model_type}")
        checked = CheckedWeights(named_tensors, self._shapes, optional=self._optional,
                                 where=f"transformers engine reference ({self.model_dir})")
        checked.precheck()
        model = copy.deepcopy(self.model)    # a failed load leaves self.reference as it was
        params = model.state_dict(keep_vars=True)
        for name, tensor in checked:
            params[name].copy_(tensor)
        loaded = checked.finish()
        self.reference = LlamaDecoder(model)
        return loaded

    @torch.inference_mode()
    def reference_logprobs(self, prompts: list[list[int]], completions: list[Completion],
                           temperature: float) -> list[list[float]]:
        """log softmax(reference logits / temperature) of each completion's tokens, in the order of
        ``completions`` (``n`` samples per prompt, as :meth:`generate` returns them). One uncached
        forward: each prompt once, its samples after it (`tulu.rl.shared_prompt`)."""
        from tulu.rl.shared_prompt import SharedPromptLayout

        if self.reference is None:
            raise RuntimeError("reference_logprobs: call load_reference first")
        groups: dict[int, list[int]] = {}
        for k, c in enumerate(completions):
            groups.setdefault(c.prompt_index, []).append(k)
        order = list(groups)
        group = max(len(v) for v in groups.values())
        # a prompt with fewer samples than the others gets empty responses in the free slots
        responses = [[completions[c].token_ids for c in groups[i]] + [[]] * (group - len(groups[i])) for i in order]
        layout = SharedPromptLayout.of(max(len(prompts[i]) for i in order), [[len(r) for r in rs] for rs in responses])
        tokens = torch.full((len(order), layout.length), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(order), layout.length), dtype=torch.bool)
        for k, i in enumerate(order):
            layout.place(tokens, valid, k, prompts[i], responses[k])
        logits = self.reference.logits_at(tokens.to(self.device), layout.rope_positions().to(self.device),
                                          layout.allowed(valid).to(self.device), layout.logits_at().to(self.device))
        logprobs = (logits.float() / temperature).log_softmax(-1)  # [prompts, group * R, V]
        R = layout.response_width
        out: list[list[float]] = [[] for _ in completions]
        for k, i in enumerate(order):
            for j, c in enumerate(groups[i]):
                ids = completions[c].token_ids
                rows = logprobs[k, j * R:j * R + len(ids)]
                out[c] = rows.gather(-1, torch.tensor(ids, device=rows.device)[:, None]).squeeze(-1).tolist()
        return out

    def close(self) -> None:
        self.model = self.decoder = self.reference = None
        self._params = {}
