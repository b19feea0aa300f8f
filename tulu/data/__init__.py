"""Data for SFT, DPO and RLVR: chat templates and loss masks, loading, packing, resumable batches.

    tok = build_tiny_tokenizer()                                   # or AutoTokenizer.from_pretrained
    data = load_sft_dataset("allenai/tulu-3-sft-mixture", tok, max_length=4096, cache_dir=...)
    loader = BatchLoader(data, batch_size=8, seed=1, dp_rank=r, dp_size=d, pack=True)
    loader.load_state_dict(ckpt["data"])                           # resume: same next batches
    for batch in loader: ...                                       # dict of [rows, max_length] tensors
"""

from tulu.data.chat import IGNORE_INDEX, TULU_CHAT_TEMPLATE, BadRow, ChatFormat, TokenizedChat
from tulu.data.loader import BatchLoader, DataState, epoch_order
from tulu.data.packing import block_causal_mask, plan_packs
from tulu.data.preference import load_preference_dataset
from tulu.data.sft import load_sft_dataset
from tulu.data.source import TokenizedDataset, load_source
from tulu.data.synthetic import make_synthetic, synthetic_rows
from tulu.data.tokenizer import build_tiny_tokenizer, save_tiny_tokenizer

__all__ = [
    "IGNORE_INDEX", "TULU_CHAT_TEMPLATE", "BadRow", "ChatFormat", "TokenizedChat",
    "BatchLoader", "DataState", "epoch_order", "block_causal_mask", "plan_packs",
    "load_preference_dataset", "load_sft_dataset", "TokenizedDataset", "load_source",
    "make_synthetic", "synthetic_rows", "build_tiny_tokenizer", "save_tiny_tokenizer",
]
