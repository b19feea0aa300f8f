"""Chat formatting and loss masks: render a conversation, tokenize it, train on assistant tokens only.

The template is chosen once, when a :class:`ChatFormat` is built: the tokenizer's own
``chat_template`` when it has one, Tülu 3's otherwise (or whichever the caller names).

Masking works on the rendered text, not on token guesses. The conversation is rendered one
message at a time; each rendering must extend the previous one (a *prefix-stable* template,
which Tülu's, Llama 3's and ChatML are). The text each message adds is its segment, tokenized on
its own. Before an assistant message the prefix is rendered with ``add_generation_prompt=True``,
so the ``<|assistant|>\\n`` header falls in the prompt and the assistant segment is exactly the
reply plus what the template closes it with (Tülu: ``content + eos``). Labels are the token ids
on assistant segments and ``IGNORE_INDEX`` (-100) elsewhere, at the same positions as the input
ids (Hugging Face convention: the model shifts; a Megatron caller shifts by one itself).
Tokenizing segment by segment equals tokenizing the whole text when segments meet at special
tokens or newlines, as they do in these templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

# Tülu 3's template (open-instruct's "tulu"): the last assistant turn ends with eos, earlier ones
# with eos + "\n".
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


class BadRow(ValueError):
    """A row that cannot be trained on; ``reason`` is a short key counted by the loaders."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]   # IGNORE_INDEX outside assistant turns


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Return ``messages`` as a list of {role, content}, or raise :class:`BadRow` saying why not."""
    if messages is None or (isinstance(messages, (list, tuple)) and len(messages) == 0):
        raise BadRow("empty_messages")
    if isinstance(messages, str) or not isinstance(messages, Sequence):
        raise BadRow("not_a_conversation", f"expected a list of messages, got {type(messages).__name__}")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise BadRow("not_a_conversation", f"message is a {type(m).__name__}, not a dict")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadRow("missing_role")
        if role not in ROLES:
            raise BadRow("unknown_role", role)
        content = m.get("content")
        if not isinstance(content, str):
            raise BadRow("missing_content", f"{role} message has content of type {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no_assistant_turn")
    return out


class ChatFormat:
    """Renders and tokenizes conversations with one chat template.

    ``chat_template``: ``None`` uses the tokenizer's own template if it has one, else Tülu 3's;
    ``"tulu"`` forces Tülu 3's; any other string is used as a Jinja template.
    """

    def __init__(self, tokenizer, chat_template: str | None = None):
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token; chat training needs one to end assistant turns")
        self.tokenizer = tokenizer
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or TULU_CHAT_TEMPLATE
        self.template = TULU_CHAT_TEMPLATE if chat_template == "tulu" else chat_template

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, is_assistant) pieces, in order."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            next_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
            text = self.render(messages[: i + 1], add_generation_prompt=next_is_assistant)
            if not text.startswith(done):
                raise BadRow("template_not_prefix_stable",
                             "rendering one more message changed earlier text; use chat_template='tulu'")
            out.append((text[len(done):], m["role"] == "assistant"))
            done = text
        return out

    def tokenize(self, messages: Any, max_length: int | None = None,
                 last_turn_only: bool = False) -> TokenizedChat:
        """Token ids and labels for one conversation; raises :class:`BadRow` for unusable rows.

        ``last_turn_only`` keeps the loss on the final assistant turn only (the default trains on
        every assistant turn, as open-instruct does).
        """
        messages = validate_messages(messages)
        segs = self.segments(messages)
        last_assistant = max(i for i, (_, a) in enumerate(segs) if a)
        pieces = self.tokenizer([s for s, _ in segs], add_special_tokens=False)["input_ids"]
        input_ids: list[int] = []
        labels: list[int] = []
        for i, ((_, is_assistant), ids) in enumerate(zip(segs, pieces)):
            train = is_assistant and (not last_turn_only or i == last_assistant)
            input_ids.extend(ids)
            labels.extend(ids if train else [IGNORE_INDEX] * len(ids))
        if max_length is not None and len(input_ids) > max_length:
            raise BadRow("too_long", f"{len(input_ids)} tokens > max_length {max_length}")
        return TokenizedChat(input_ids, labels)
