"""An lmforge checkpoint as a model of EleutherAI's lm-evaluation-harness (``lm-eval``).

Importing this module registers the model name ``lmforge`` with lm-eval (version 0.4.x has
no plugin entry points, so the module must be imported before lm-eval looks the name up).
From the command line, this module is lm-eval's own CLI with the model registered::

    python -m lmforge.eval.harness run --model lmforge --model_args pretrained=runs/x \\
        --tasks hellaswag --batch_size 16 --device cpu

(lm-eval's usual arguments, ``run`` included; ``lm_eval ...`` itself does not know the name.)
From Python::

    import lm_eval
    import lmforge.eval.harness  # noqa: F401  (registers "lmforge")
    results = lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/x", tasks=[...])

``model_args``: ``pretrained`` (a checkpoint, a run directory, or an adapter checkpoint),
``device`` (cpu), ``dtype`` (auto|float32|bfloat16), ``quantize`` (none|bf16|int8|int4),
``batch_size`` (scoring rows per forward and sequences decoded together; ``auto`` is 16; on
the command line lm-eval's ``--batch_size`` gives it, not ``model_args``),
``max_length`` (default the model's context), ``max_gen_toks`` (256).

**What runs.** ``loglikelihood`` tokenizes each ``(context, continuation)`` at lm-eval's
boundary (all trailing whitespace of the context moves to the continuation; the context is
encoded alone and the continuation is the rest of the whole string's tokens:
:func:`lmforge.eval.prompting.encode_pair`, after lm-eval's whitespace rule; an empty context
becomes the end-of-text token) and scores with :func:`lmforge.eval.prompting.score_token_pairs`
(one forward per pair, batched longest first; contexts too long lose tokens from the left).
``loglikelihood_rolling`` scores lm-eval's rolling windows (``get_rolling_token_windows``,
the end-of-text token as prefix) the same way. ``generate_until`` runs the one inference engine
(:class:`~lmforge.infer.engine.InferenceEngine`, greedy unless ``do_sample``), with the context
cut from the left to leave ``max_gen_toks`` of room, and stops at the ``until`` strings. With
``--apply_chat_template`` prompts are rendered by the checkpoint's chat template
(:class:`~lmforge.tokenizer.chat.ChatTemplate`).

**The alternative without this module:** serve the checkpoint (``lmforge serve runs/x``) and
point lm-eval's ``local-completions`` model at ``/v1/completions``, which answers prompt
scoring (``echo`` with ``logprobs``) and generation; lm-eval then needs the model's Hugging
Face tokenizer (``tokenizer=...`` in ``model_args``) to split contexts from continuations.
See the README section "lm-evaluation-harness".
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

from ..errors import ConfigError

if __name__ == "__main__":  # `python -m lmforge.eval.harness`: one module object, one registration
    sys.modules.setdefault("lmforge.eval.harness", sys.modules[__name__])

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models, registered lazily, stay available)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the environment
    raise ConfigError("the lm-evaluation-harness bridge needs lm-eval: pip install lm-eval") from None

DEFAULT_BATCH = 16


def _batch_size(value: Any) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return n


@register_model("lmforge")
class LmforgeLM(LM):
    """lm-eval's ``LM`` interface over an lmforge checkpoint (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        checkpoint: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        quantize: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        progress: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        from ..infer.engine import load_engine

        path = pretrained or checkpoint
        if not path:
            raise ConfigError("the lmforge model needs a checkpoint: --model_args pretrained=PATH")
        self.batch_size = _batch_size(batch_size)
        if max_batch_size is not None and batch_size is not None and str(batch_size).startswith("auto"):
            self.batch_size = min(self.batch_size, int(max_batch_size))
        quantize = None if quantize in (None, "none", "None") else str(quantize)
        self.engine = load_engine(
            str(path), device=str(device or "cpu"), dtype=str(dtype), quantize=quantize,
            max_batch_size=self.batch_size,
        )
        self.model = self.engine.model
        self.tokenizer = self.engine.tokenizer
        self.checkpoint = self.engine.checkpoint
        self._device = self.engine.device
        context = int(self.model.config.context_length) - self.engine.virtual_tokens
        self.max_length = min(int(max_length), context) if max_length else context
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self._template = None

    # ---- lm-eval's conventions ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eot_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``TemplateLM`` tokenization: an empty context is the prefix token (or the
        continuation's first token when that is the prefix token); otherwise all trailing
        whitespace of the context moves to the continuation, then :func:`encode_pair`."""
        from .prompting import encode_pair

        if context == "":
            cont = self.tokenizer.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return encode_pair(self.tokenizer, context, continuation)

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of token pairs, contexts cut to fit, longest first."""
        from tqdm import tqdm

        from .prompting import _fit, score_token_pairs

        limit = self.max_length + 1  # the last continuation token is a target, never an input
        fitted = [(_fit(list(c), len(x), limit), list(x)) for c, x in pairs]
        order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(fitted)
        chunk = self.batch_size * 4
        with tqdm(total=len(order), desc=desc, disable=not self.progress, dynamic_ncols=True) as bar:
            for start in range(0, len(order), chunk):
                part = order[start : start + chunk]
                scored = score_token_pairs(self.model, [fitted[i] for i in part], batch_size=self.batch_size,
                                           with_greedy=True)
                for i, s in zip(part, scored):
                    out[i] = s
                bar.update(len(part))
        return out

    # ---- the three request types -------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self._score(pairs, "loglikelihood")
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (text,) = req.args
            for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )):
                windows.append(w)
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owner, self._score(windows, "loglikelihood_rolling")):
            totals[r] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        from ..infer.chat import end_of_turn_ids
        from ..infer.sampling import SamplingParams

        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items(), key=lambda kv: kv[0]))].append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_gen} leaves no room for context in {self.max_length} positions")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
            params = SamplingParams(
                max_tokens=max_gen, temperature=temperature, stop=until, stop_token_ids=end_of_turn_ids(self.tokenizer),
                top_p=float(kwargs.get("top_p", 1.0)) if do_sample else 1.0,
                top_k=int(kwargs.get("top_k", 0) or 0) if do_sample else 0,
                seed=int(kwargs["seed"]) if "seed" in kwargs else None,
            )
            prompts = []
            for i in idx:
                ids = self.tokenizer.encode(requests[i].args[0]) or [self.prefix_token_id]
                prompts.append(ids[-(self.max_length - max_gen) :])
            from ..infer.sampling import seeded

            done = self.engine.generate(prompts, seeded(params, len(prompts)), progress=self.progress)
            for i, c in zip(idx, done):
                out[i] = c.text
                self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out

    # ---- chat templates (--apply_chat_template) ----------------------------------------------
    def _chat(self) -> Any:
        if self._template is None:
            from ..tokenizer.chat import ChatTemplate

            self._template = ChatTemplate.from_checkpoint(self.checkpoint)
        return self._template

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._chat().source if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._chat().render(chat_history, add_generation_prompt=add_generation_prompt)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``lmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
