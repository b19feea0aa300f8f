"""The tiny tokenizer: made in code, no downloads, round-trips text, loads back from disk."""

import json

from transformers import AutoTokenizer

from tulu.data import TULU_CHAT_TEMPLATE, build_tiny_tokenizer, save_tiny_tokenizer
from tulu.data.tokenizer import ASSISTANT, EOS, PAD, SYSTEM, USER

TEXTS = ["What is 23+58?", "23+58=81. The answer is 81.", "  spaces\tand\nnewlines  ",
         "unicode: héllo wörld 🤖 日本語", ""]


def test_tiny_tokenizer_round_trips_any_text():
    tok = build_tiny_tokenizer()
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_tiny_tokenizer_is_small_and_has_single_token_specials():
    tok = build_tiny_tokenizer()
    assert len(tok) <= 512
    for special in (PAD, EOS, SYSTEM, USER, ASSISTANT):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == TULU_CHAT_TEMPLATE


def test_tiny_tokenizer_loads_back_from_disk_via_autotokenizer(tmp_path):
    folder = save_tiny_tokenizer(tmp_path / "tok dir")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(folder))
    orig = build_tiny_tokenizer()
    assert len(loaded) == len(orig)
    assert loaded.pad_token_id == orig.pad_token_id and loaded.eos_token_id == orig.eos_token_id
    assert loaded.chat_template == orig.chat_template
    for text in TEXTS:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == orig(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|user|>\nhi\n<|assistant|>\n"
