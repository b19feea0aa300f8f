"""Generation throughput: the transformers engine vs vLLM on the same tiny model and prompts.

    python bench/bench_generation.py [--quick] [--engines transformers,vllm] [--hidden 256]

Prints one JSON line per figure: {"bench": "generation", "engine", "prompts", "n",
"max_new_tokens", "new_tokens", "seconds", "tokens_per_s", ...}. Generated tokens only (prompt
tokens are not counted); eos is disabled so every completion runs to the length limit. The first
(warm-up) call of each engine is not timed; the startup time is its own figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _emit(**fields) -> None:
    print(json.dumps({"bench": "generation", **fields}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few tokens (~1 min)")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/torch threads (default 1: on a few shared cores more threads "
                             "spin against each other and both engines slow down 10-30x)")
    args = parser.parse_args(argv)
    prompts_count = args.prompts or (8 if args.quick else 32)
    n = args.n or (4 if args.quick else 8)
    max_new = args.max_new_tokens or (32 if args.quick else 128)
    repeats = 1 if args.quick else args.repeats

    # vLLM logs to stdout by default; this stream is JSON lines only.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from tulu.inference import SamplingSettings, make_engine
    from tulu.inference.tiny import save_tiny_llama

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 261, (int(torch.randint(8, 33, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(prompts_count)]
    # stop_token_ids=() : no stop token at all, every completion has max_new tokens.
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=max_new, seed=0,
                                stop_token_ids=())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_llama(Path(tmp) / "model", hidden_size=args.hidden,
                                    intermediate_size=2 * args.hidden,
                                    num_hidden_layers=args.layers)
        params = sum(p.numel() for p in
                     __import__("safetensors.torch", fromlist=["load_file"])
                     .load_file(str(model_dir / "model.safetensors")).values())
        for kind in [e.strip() for e in args.engines.split(",") if e.strip()]:
            start = time.perf_counter()
            extra = {"max_model_len": 256, "dtype": "float32"} if kind == "vllm" else {}
            try:
                engine = make_engine(kind, model_dir, **extra)
            except ImportError as err:
                _emit(engine=kind, skipped=f"{type(err).__name__}: {err}")
                continue
            _emit(engine=kind, figure="startup_s", seconds=round(time.perf_counter() - start, 3))
            engine.generate(prompts[:2], 1, SamplingSettings(max_new_tokens=4, seed=0))
            best = None
            for _ in range(repeats):
                start = time.perf_counter()
                outs = engine.generate(prompts, n, sampling)
                seconds = time.perf_counter() - start
                tokens = sum(len(c.token_ids) for c in outs)
                if best is None or seconds < best[0]:
                    best = (seconds, tokens)
            seconds, tokens = best
            _emit(engine=kind, figure="tokens_per_s", params=params, prompts=prompts_count, n=n,
                  max_new_tokens=max_new, new_tokens=tokens, seconds=round(seconds, 3),
                  tokens_per_s=round(tokens / seconds, 1), threads=torch.get_num_threads())
            engine.close()


if __name__ == "__main__":
    main()
