"""Chat templates: conversations -> token ids and completion-only labels.

Two layouts (TEMPLATE_SPECS):

  chatml     <|im_start|>{role}\\n{content}<|im_end|>\\n         per message
             generation prompt <|im_start|>assistant\\n; stops on <|im_end|> (and <|endoftext|>)
  parchment  {role}\\n{content}<|endoftext|>\\n                   per message (ParchmentLM-166M's format)
             generation prompt assistant\\n; stops on <|endoftext|>

Labels copy the ids of each assistant turn's content and of its end token, so the model
learns to answer *and to stop*; everything else (system/user turns, role headers, the
newline after an end token) is -100, the loss's ignore index.

Special tokens are always inserted as their single ids, never tokenized from text, and a
message whose content spells a special token is rejected: otherwise a user could close a
turn by typing "<|im_end|>". Content is stripped of surrounding whitespace (as the Jinja
template's `| trim` does), which makes "header + content" tokenize the same whether the
pieces are encoded apart (here, for the label mask) or as one string (transformers'
`apply_chat_template`): a byte-level pre-tokenizer would otherwise merge the header's
"\\n" with leading spaces of the content.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llm_maker.errors import LLMMakerError
from llm_maker.tokenizer.tokenizer import EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS, Tokenizer

IGNORE_INDEX = -100  # LlamaModel's loss ignores these targets
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TemplateSpec:
    start_token: str | None  # special token opening each turn (None: the role header opens it)
    end_token: str  # special token closing each turn; labelled on assistant turns
    stop_tokens: tuple[str, ...]  # generation stops on any of these


TEMPLATE_SPECS: dict[str, TemplateSpec] = {
    "chatml": TemplateSpec(start_token=IM_START, end_token=IM_END, stop_tokens=(IM_END, EOS)),
    "parchment": TemplateSpec(start_token=None, end_token=EOS, stop_tokens=(EOS,)),
}


def template_spec(template: str) -> TemplateSpec:
    if template not in TEMPLATE_SPECS:
        raise LLMMakerError(f"unknown chat template {template!r}; choose one of {tuple(TEMPLATE_SPECS)}")
    return TEMPLATE_SPECS[template]


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation's shape; raise LLMMakerError naming the offending index and role."""
    if not isinstance(messages, list) or not messages:
        raise LLMMakerError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LLMMakerError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
        role = m.get("role")
        if role not in ROLES:
            raise LLMMakerError(f"messages[{i}] has role {role!r}; must be one of {ROLES}")
        content = m.get("content")
        if not isinstance(content, str):
            raise LLMMakerError(f"messages[{i}] ({role}) content must be a string, got {type(content).__name__}")
        for tok in SPECIAL_TOKENS:
            if tok in content:
                raise LLMMakerError(f"messages[{i}] ({role}) content contains the special token {tok}")
    return messages


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    tid = tokenizer.token_id(token)
    if tid is None:
        raise LLMMakerError(f"{tokenizer.source}: tokenizer lacks the special token {token}")
    return tid


def _turn_pieces(tokenizer: Tokenizer, spec: TemplateSpec, role: str) -> tuple[list[int], list[int]]:
    """(ids before the content, ids after it) of one turn; the end token is the first id after."""
    head = ([_special_id(tokenizer, spec.start_token)] if spec.start_token else []) + tokenizer.encode(f"{role}\n")
    tail = [_special_id(tokenizer, spec.end_token)] + tokenizer.encode("\n")
    return head, tail


def encode_chat(tokenizer: Tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """(ids, labels), both of length T: labels equal ids on assistant content and its end token."""
    spec = template_spec(template)
    validate_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head, tail = _turn_pieces(tokenizer, spec, m["role"])
        content = tokenizer.encode(m["content"].strip())
        ids += head + content + tail
        labels += [IGNORE_INDEX] * len(head)
        if m["role"] == "assistant":
            labels += content + tail[:1] + [IGNORE_INDEX] * (len(tail) - 1)
        else:
            labels += [IGNORE_INDEX] * (len(content) + len(tail))
    return ids, labels


def prompt_ids(tokenizer: Tokenizer, messages: list[dict], template: str) -> list[int]:
    """The conversation so far plus the assistant header: what generation continues from."""
    spec = template_spec(template)
    ids = encode_chat(tokenizer, messages, template)[0] if messages else []
    head, _ = _turn_pieces(tokenizer, spec, "assistant")
    return ids + head


def stop_token_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    return [_special_id(tokenizer, t) for t in template_spec(template).stop_tokens]


def end_token(template: str) -> str:
    """The token that closes an assistant turn: the `eos_token` of an exported tokenizer."""
    return template_spec(template).end_token


def jinja_chat_template(template: str) -> str:
    """The Hugging Face `chat_template` that renders exactly what `encode_chat` encodes."""
    spec = template_spec(template)
    start = f"'{spec.start_token}' + " if spec.start_token else ""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}"
        "{%- endif -%}"
        f"{{{{- {start}message['role'] + '\\n' + (message['content'] | trim) + '{spec.end_token}' + '\\n' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {start}'assistant\\n' -}}}}{{%- endif -%}}"
    )


def hf_tokenizer_config(template: Optional[str], model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for transformers. With a chat template: the Jinja template and its end
    token as eos; without one (a base model): <|endoftext|> as eos and no template."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
                              "bos_token": None, "model_max_length": model_max_length,
                              "clean_up_tokenization_spaces": False}
    if template:
        config.update(chat_template=jinja_chat_template(template), eos_token=end_token(template))
    return config
