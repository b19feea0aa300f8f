"""Chat template and loss masks: the loss sees assistant tokens (and their eos) and nothing else."""

import pytest

from tulu.data import IGNORE_INDEX, TULU_CHAT_TEMPLATE, BadRow, ChatFormat, build_tiny_tokenizer

CONVO = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2=4. The answer is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "The answer is 6."},
]

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _expected(tok, pieces):
    """pieces: (text, trained) -> (input_ids, labels) built by hand."""
    ids, labels = [], []
    for text, trained in pieces:
        t = _enc(tok, text)
        ids += t
        labels += t if trained else [IGNORE_INDEX] * len(t)
    return ids, labels


def test_masks_cover_exactly_assistant_tokens_with_tulu_template():
    tok = build_tiny_tokenizer()
    tc = ChatFormat(tok).tokenize(CONVO)
    ids, labels = _expected(tok, [
        ("<|system|>\nYou add numbers.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n", False),
        ("2+2=4. The answer is 4.<|endoftext|>", True),
        ("\n<|user|>\nAnd 3+3?\n<|assistant|>\n", False),
        ("The answer is 6.<|endoftext|>", True),
    ])
    assert tc.input_ids == ids
    assert tc.labels == labels
    # and the whole sequence is exactly what the template renders
    assert tc.input_ids == _enc(tok, ChatFormat(tok).render(CONVO))


def test_last_turn_only_masks_earlier_assistant_turns():
    tok = build_tiny_tokenizer()
    tc = ChatFormat(tok).tokenize(CONVO, last_turn_only=True)
    trained = [i for i, lab in zip(tc.input_ids, tc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "The answer is 6.<|endoftext|>"


def test_tokenizer_own_template_is_used_and_masks_follow_it():
    tok = build_tiny_tokenizer(chat_template=CHATML)
    chat = ChatFormat(tok)
    assert chat.template == CHATML
    tc = chat.tokenize(CONVO)
    trained = [i for i, lab in zip(tc.input_ids, tc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "2+2=4. The answer is 4.<|im_end|>\nThe answer is 6.<|im_end|>\n"
    assert tok.decode(tc.input_ids) == chat.render(CONVO)


def test_tulu_template_is_the_fallback_for_tokenizers_without_one():
    tok = build_tiny_tokenizer(chat_template=None)
    assert not tok.chat_template
    assert ChatFormat(tok).template == TULU_CHAT_TEMPLATE
    forced = ChatFormat(build_tiny_tokenizer(chat_template=CHATML), "tulu")
    assert forced.template == TULU_CHAT_TEMPLATE
    assert forced.render(CONVO[1:3]).startswith("<|user|>\nWhat is 2+2?\n<|assistant|>\n")


def test_generation_prompt_ends_with_assistant_header():
    chat = ChatFormat(build_tiny_tokenizer())
    assert chat.render(CONVO[:2], add_generation_prompt=True) == \
        "<|system|>\nYou add numbers.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"


@pytest.mark.parametrize("messages,reason", [
    ([], "empty_messages"),
    (None, "empty_messages"),
    ("just text", "not_a_conversation"),
    ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "missing_role"),
    ([{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown_role"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "missing_content"),
    ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
])
def test_bad_conversations_raise_bad_row_with_reason(messages, reason):
    with pytest.raises(BadRow) as e:
        ChatFormat(build_tiny_tokenizer()).tokenize(messages)
    assert e.value.reason == reason


def test_over_long_conversation_is_a_bad_row():
    with pytest.raises(BadRow) as e:
        ChatFormat(build_tiny_tokenizer()).tokenize(CONVO, max_length=10)
    assert e.value.reason == "too_long"


def test_template_that_rewrites_history_is_rejected_not_mismasked():
    # numbers each message by the total count: earlier text changes as messages are added
    template = "{% for m in messages %}{{ messages|length|string + m['content'] }}{% endfor %}"
    with pytest.raises(BadRow) as e:
        ChatFormat(build_tiny_tokenizer(chat_template=template)).tokenize(CONVO)
    assert e.value.reason == "template_not_prefix_stable"
