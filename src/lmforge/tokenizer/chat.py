"""Chat templates: conversations rendered to text with a model's own Jinja template.

Templates come from model files written by strangers, so they run in Jinja's immutable
sandbox (no attribute access to Python internals, no mutation of the inputs), with the
same environment Hugging Face transformers uses (``trim_blocks``, ``lstrip_blocks``,
loop controls, a ``tojson`` filter, ``raise_exception`` and ``strftime_now``): the same
template and messages render to the same string in both. A checkpoint without a template
uses ChatML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import DataError, LmforgeError
from .base import token_name

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _generation_extension():
    """``{% generation %}...{% endgeneration %}``: the markers some templates put around assistant
    replies (transformers' ``return_assistant_tokens_mask``); the body renders unchanged (the
    SFT objective finds assistant tokens by rendering prefixes, with or without markers)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return Generation


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be an object with text 'role' and 'content' fields")


@dataclass
class ChatTemplate:
    """A Jinja chat template with the special-token names it may refer to (bos_token, eos_token...)."""

    source: str = CHATML
    special_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import jinja2

        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise LmforgeError(f"the chat template does not compile: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The conversation as prompt text (ending with the assistant's turn header when asked)."""
        import jinja2
        from jinja2.sandbox import SecurityError

        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
            )
        except SecurityError as e:
            raise LmforgeError(f"the chat template tried an unsafe operation: {e}") from None
        except jinja2.TemplateError as e:
            raise LmforgeError(f"the chat template rejected the conversation: {e}") from None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplate:
        """The template a checkpoint carries (config.json, chat_template.jinja/.json or
        tokenizer_config.json, in that order), or ChatML when it has none."""
        path = Path(path)
        config = _read_json(path / "config.json")
        tok = config.get("tokenizer") or {}
        specials = {k: v for k, v in tok.items() if k.endswith("_token") and isinstance(v, str)}
        source = tok.get("chat_template")
        if not isinstance(source, str) and (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(source, str):
            source = _read_json(path / "chat_template.json").get("chat_template")
        if not isinstance(source, str):
            tok_cfg = _read_json(path / "tokenizer_config.json")
            source = tok_cfg.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
            for k, v in tok_cfg.items():
                if k.endswith("_token") and k not in specials and (name := token_name(v)):
                    specials[k] = name
        return cls(source if isinstance(source, str) else CHATML, specials)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}
