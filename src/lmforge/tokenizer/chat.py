"""Chat templates: conversations rendered to text with a model's own Jinja template.

Templates come from model files written by strangers, so they run in Jinja's immutable
sandbox (no attribute access to Python internals, no mutation of the inputs), with the
same environment Hugging Face transformers uses (``trim_blocks``, ``lstrip_blocks``,
loop controls, a ``tojson`` filter, ``raise_exception`` and ``strftime_now``): the same
template and messages render to the same string in both. A checkpoint without a template
uses ChatML.

The sandbox stops escapes, not work: ``{{ 10**10000000 }}`` held the interpreter (and with
it every thread of a server) for 21.9 s in one C call. The operators that can do that in one
step are bounded here: ``**`` and ``*`` of integers to :data:`MAX_INT_BITS` bits, ``*`` and
``+`` of strings and lists and the integer arguments of calls to :data:`MAX_ITEMS` items, so
no single operation allocates or computes without bound. Loops, recursion and the sum of
many operations are bounded where the render runs: the server renders in a worker process
with a time and memory limit (``serve/templates.py``); elsewhere (``lmforge chat``, SFT
data) the template is the user's own choice of model and Ctrl-C stops it. Any failure of a
template, Jinja's or not (ZeroDivisionError, RecursionError, TypeError...), is one
:class:`LmforgeError` naming it, never a traceback.
"""

from __future__ import annotations

import json
import re
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


#: Largest integer an operator of a template may produce (bits): 10**10000000 is refused.
MAX_INT_BITS = 1 << 16
#: Largest string or list one operation may produce, and largest integer argument of a call
#: (``'x'.center(n)``, ``(1).to_bytes(n)``, ``items|batch(n, fill)``).
MAX_ITEMS = 1 << 22


class TemplateLimit(LmforgeError):
    """A template operation would exceed the bounds above."""


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _int_bits(x: Any) -> int:
    return abs(x).bit_length() if isinstance(x, int) and not isinstance(x, bool) else 0


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would exceed the bounds, before computing it."""
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if right * max(1, _int_bits(left) - 1) > MAX_INT_BITS:
            raise TemplateLimit(f"{left} ** {right} is larger than {MAX_INT_BITS} bits")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
                raise TemplateLimit(f"a product larger than {MAX_INT_BITS} bits")
        else:
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int) and _size(seq) * max(n, 0) > MAX_ITEMS:
                    raise TemplateLimit(f"repeating {_size(seq)} items {n} times exceeds {MAX_ITEMS} items")
    elif op == "+" and _size(left) is not None and _size(right) is not None:
        if _size(left) + _size(right) > MAX_ITEMS:
            raise TemplateLimit(f"joining {_size(left)} and {_size(right)} items exceeds {MAX_ITEMS} items")
    elif op == "%" and isinstance(left, (str, bytes)):
        args = right if isinstance(right, tuple) else (right,)
        widths = [int(w) for w in re.findall(r"%[-#0 +]*(\d+)", left if isinstance(left, str) else left.decode("latin-1"))]
        if any(w > MAX_ITEMS for w in widths) or any(isinstance(a, int) and a > MAX_ITEMS for a in args):
            raise TemplateLimit(f"a format width larger than {MAX_ITEMS}")


def _check_call(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and a > MAX_ITEMS:
            raise TemplateLimit(f"a call with the argument {a} (larger than {MAX_ITEMS})")


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

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"**", "*", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
            _check_call(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_extension()])
    for name, fn in list(env.filters.items()):  # filters are called directly, not through env.call
        env.filters[name] = _bounded_filter(fn)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _bounded_filter(fn):
    import functools

    @functools.wraps(fn)
    def bounded(*args, **kwargs):
        _check_call(args, kwargs)
        return fn(*args, **kwargs)

    return bounded


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
        except TemplateLimit as e:
            raise LmforgeError(f"the chat template exceeded a limit: {e}") from None
        except jinja2.TemplateError as e:
            raise LmforgeError(f"the chat template rejected the conversation: {e}") from None
        except MemoryError:
            raise LmforgeError("the chat template ran out of memory") from None
        except RecursionError:
            raise LmforgeError("the chat template recursed too deeply") from None
        except Exception as e:  # noqa: BLE001 - a template is code from a model file: any failure is its own
            raise LmforgeError(f"the chat template failed: {type(e).__name__}: {_short(e)}") from None

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


def _short(e: BaseException, limit: int = 200) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}
