"""A tiny byte-level tokenizer the project builds itself, for tests and tiny models on CPU.

Nothing is downloaded: the vocabulary is the 256 byte values plus five special tokens, so any
UTF-8 text round-trips exactly (``decode(encode(text)) == text``). It is a
``PreTrainedTokenizerFast`` backed by ``tokenizers``; ``save_pretrained`` writes
``tokenizer.json`` and ``tokenizer_config.json``, which ``AutoTokenizer.from_pretrained(folder)``
and vLLM load like any hub tokenizer. It carries Tülu 3's chat template.

    python -m tulu.data.tokenizer OUT_DIR      # writes the tokenizer folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tulu.atomic import write_text_atomic
from tulu.data.chat import TULU_CHAT_TEMPLATE

PAD, EOS, SYSTEM, USER, ASSISTANT = "<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, EOS, SYSTEM, USER, ASSISTANT)   # ids 0..4; byte b has id len(SPECIAL_TOKENS) + b
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (what the ByteLevel decoder inverts)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tiny_tokenizer(*, chat_template: str | None = TULU_CHAT_TEMPLATE,
                         model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer in memory (vocab 261: 5 specials, then 256 bytes).

    ``chat_template=None`` leaves the tokenizer without a template (to test the fallback path).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + b for b, ch in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def save_tiny_tokenizer(out_dir: str | Path, **kwargs) -> Path:
    """Build the tiny tokenizer and ``save_pretrained`` it into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    build_tiny_tokenizer(**kwargs).save_pretrained(str(out))
    # Name the class every transformers version knows (v5 writes its own alias), atomically.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_text_atomic(cfg_path, json.dumps(cfg, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny byte-level tokenizer to a folder.")
    parser.add_argument("out_dir")
    print(save_tiny_tokenizer(parser.parse_args(argv).out_dir))


if __name__ == "__main__":
    main()
