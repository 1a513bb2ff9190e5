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
from datetime import datetime
from typing import Any, Optional, Union

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


@dataclass(frozen=True)
class JinjaTemplate:
    """A model's own Hugging Face chat template (config.json's extra["jinja_chat_template"]), rendered
    as transformers' `apply_chat_template` renders it; generation stops on `stop_ids`."""

    text: str
    stop_ids: tuple[int, ...]
    special_tokens: tuple[tuple[str, str], ...] = ()  # (bos_token, "<s>"), ...: the template's variables

    def __str__(self) -> str:
        return "the model's own (Jinja)"

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_jinja(self.text, messages, add_generation_prompt, **dict(self.special_tokens))


ChatFormat = Union[str, JinjaTemplate]  # a TEMPLATE_SPECS name, or a model's own Jinja template


def render_chat_jinja(text: str, messages: list[dict], add_generation_prompt: bool = True,
                      **special_tokens: str) -> str:
    """`text` rendered as transformers renders chat templates: a sandboxed environment with trim_blocks,
    lstrip_blocks and loop controls, `raise_exception` and `strftime_now`, the special tokens as variables."""
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LLMMakerError("rendering the model's own chat template needs jinja2 (pip install 'llm-maker[hf]')") \
            from None

    def raise_exception(message: str) -> None:
        raise LLMMakerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(text).render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise LLMMakerError(f"the model's chat template does not render: {e}") from None


def prompt_ids(tokenizer: Tokenizer, messages: list[dict], template: ChatFormat) -> list[int]:
    """The conversation so far plus the assistant header: what generation continues from."""
    if isinstance(template, JinjaTemplate):  # special tokens in the rendered text become their ids
        return tokenizer.encode(template.render(validate_messages(messages) if messages else []))
    spec = template_spec(template)
    ids = encode_chat(tokenizer, messages, template)[0] if messages else []
    head, _ = _turn_pieces(tokenizer, spec, "assistant")
    return ids + head


def stop_token_ids(tokenizer: Tokenizer, template: ChatFormat) -> list[int]:
    if isinstance(template, JinjaTemplate):
        return list(template.stop_ids)
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


PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]


def render_jinja(template: str, messages: list[dict[str, str]]) -> Optional[str]:
    """`template` rendered as transformers renders chat templates (`render_chat_jinja`, no special
    tokens), or None when it does not render."""
    try:
        return render_chat_jinja(template, messages, add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:  # a broken or exotic template: not one of ours
        return None


def template_name_of(jinja: Optional[str]) -> Optional[str]:
    """Our template (chatml, parchment) that renders a conversation with a system turn exactly as
    `jinja` does, else None. (SmolLM2's adds a default system turn only when none is given.)"""
    if not jinja:
        return None
    theirs = render_jinja(jinja, PROBE_CHAT)
    for name in TEMPLATE_SPECS:
        if theirs is not None and theirs == render_jinja(jinja_chat_template(name), PROBE_CHAT):
            return name
    return None
