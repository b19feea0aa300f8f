"""Data for SFT, DPO and RLVR: chat templates and loss masks, loading, packing, resumable batches.

    tok = build_tiny_tokenizer()                                   # or AutoTokenizer.from_pretrained
    data = load_sft_dataset("allenai/tulu-3-sft-mixture", tok, max_length=4096, cache_dir=...)
    loader = BatchLoader(data, batch_size=8, seed=1, dp_rank=r, dp_size=d, pack=True)
    loader.load_state_dict(ckpt["data"])                           # resume: same next batches
    for batch in loader: ...                                       # dict of [rows, max_length] tensors

Names are imported lazily, so ``python -m tulu.data.synthetic`` and a tokenizer-only user do not
pay for ``datasets`` and ``torch``.
"""

import importlib

_EXPORTS = {
    "tulu.data.chat": ["IGNORE_INDEX", "TULU_CHAT_TEMPLATE", "BadRow", "ChatFormat", "TokenizedChat"],
    "tulu.data.loader": ["BatchLoader", "DataState", "epoch_order"],
    "tulu.data.packing": ["block_causal_mask", "plan_packs"],
    "tulu.data.preference": ["load_preference_dataset"],
    "tulu.data.sft": ["load_sft_dataset"],
    "tulu.data.source": ["TokenizedDataset", "load_source"],
    "tulu.data.synthetic": ["make_synthetic", "synthetic_rows"],
    "tulu.data.tasks": ["sft_rows", "task_rows", "write_task_data"],
    "tulu.data.tokenizer": ["build_tiny_tokenizer", "save_tiny_tokenizer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'tulu.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
