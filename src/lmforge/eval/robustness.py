"""Robustness: a model's metric on inputs perturbed at several noise rates.

**Perturbations** (:func:`perturb_texts`, seeded, one ``random.Random(f"{seed}:{i}")`` per
text, so a text's noise does not depend on the others):

- ``delete``, ``swap``, ``mask``: the word-level token noise of ``lmforge data augment``
  (:func:`lmforge.data.augment.token_noise`): each word deleted, swapped with its neighbour or
  replaced by ``mask_token`` with probability ``rate`` (a line never loses all its words);
- ``typo``: each character (other than whitespace) replaced by a random letter with
  probability ``rate``.

Rate 0 returns the texts unchanged. The same random numbers are drawn at every rate, so for
``delete``, ``mask`` and ``typo`` the words or characters hit at a rate are a subset of those
hit at a higher rate.

**Metrics** (:func:`evaluate_robustness`): perplexity (and bits per byte) of the perturbed
texts, and classification accuracy / macro-F1 on perturbed texts, by a checkpoint's
classification head or by prompting (:mod:`lmforge.eval.prompting`, a task's template and
verbalizers). The result is a table (JSON + markdown) and a PNG of the metric against the
noise rate. **Noise-augmented training** reuses ``lmforge data augment`` (``copies`` noisy
copies of every training record beside the originals), then ``lmforge finetune`` on its output.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError

KINDS = ("delete", "swap", "mask", "typo")
_LETTERS = string.ascii_lowercase


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"a noise rate must be a number in [0, 1], got {rate!r}")
    return float(rate)


def _typos(text: str, rng: random.Random, rate: float) -> str:
    out = []
    for ch in text:
        hit = rng.random() < rate
        letter = _LETTERS[rng.randrange(len(_LETTERS))]
        out.append(letter if hit and not ch.isspace() else ch)
    return "".join(out)


def perturb_text(text: str, kind: str, rate: float, rng: random.Random, mask_token: str = "<mask>") -> str:
    """``text`` with noise ``kind`` at ``rate`` drawn from ``rng`` (see the module notes)."""
    from ..data.augment import token_noise

    if kind not in KINDS:
        raise ConfigError(f"unknown perturbation {kind!r}; choose one of {', '.join(KINDS)}")
    rate = _check_rate(rate)
    if rate == 0.0:
        return text
    if kind == "typo":
        return _typos(text, rng, rate)
    probs = {"delete": (rate, 0.0, 0.0), "swap": (0.0, rate, 0.0), "mask": (0.0, 0.0, rate)}[kind]
    return token_noise(text, rng, *probs, mask_token)


def perturb_texts(
    texts: Sequence[str], kind: str, rate: float, seed: int = 0, mask_token: str = "<mask>"
) -> list[str]:
    """Every text perturbed by ``kind`` noise at ``rate`` (in [0, 1]); deterministic in ``seed``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown perturbation {kind!r}; choose one of {', '.join(KINDS)}")
    _check_rate(rate)
    return [perturb_text(t, kind, rate, random.Random(f"{seed}:{i}"), mask_token) for i, t in enumerate(texts)]


# -------------------------------------------------------------------------------- metrics
@torch.no_grad()
def text_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> dict[str, float]:
    """Next-token loss over ``texts``, each scored on its own (cut into windows of the model's
    context; every token after a text's first is predicted): ``loss`` (nats/token), ``ppl``,
    ``bpb`` (bits per UTF-8 byte of the predicted tokens) and ``tokens``."""
    from ..runs.metrics import bits_per_byte, token_byte_lengths

    T = model.config.context_length
    device = next(model.parameters()).device
    rows: list[list[int]] = []
    for ids in tokenizer.encode_batch(list(texts)):
        for start in range(0, max(0, len(ids) - 1), T):
            chunk = ids[start : start + T + 1]
            if len(chunk) > 1:
                rows.append(chunk)
    if not rows:
        raise ConfigError("no text has two or more tokens to score")
    byte_len = torch.from_numpy(token_byte_lengths(tokenizer))
    was_training = model.training
    model.eval()
    nats = n_tok = n_bytes = 0.0
    try:
        rows.sort(key=len)
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            L = max(len(r) for r in batch) - 1
            x = torch.zeros(len(batch), L, dtype=torch.long)
            y = torch.full((len(batch), L), -100, dtype=torch.long)
            for r, ids in enumerate(batch):
                x[r, : len(ids) - 1] = torch.tensor(ids[:-1])
                y[r, : len(ids) - 1] = torch.tensor(ids[1:])
            logits = model.logits(model.hidden_states(x.to(device))).float()
            y = y.to(device)
            nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                          reduction="sum"))
            real = y[y != -100].cpu()
            n_tok += real.numel()
            n_bytes += float(byte_len[real.clamp(max=len(byte_len) - 1)].sum())
    finally:
        model.train(was_training)
    loss = nats / n_tok
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bits_per_byte(nats, int(n_bytes)), "tokens": int(n_tok)}


@torch.no_grad()
def head_predictions(model: Any, tokenizer: Any, texts: Sequence[str], template: str = "{text}",
                     batch_size: int = 32) -> list[int]:
    """Label indices predicted by the model's classification head (the last real token of
    ``template`` filled with each text; longer inputs keep their end, as in training)."""
    from ..data.encoding import pad_batch

    if not getattr(model.config, "num_labels", 0):
        raise ConfigError("the model has no classification head; use method=prompt (a task's prompt)")
    max_len = model.config.context_length - getattr(model, "virtual_tokens", 0)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
    encoded = [ids[-max_len:] or [tokenizer.eot_id] for ids in tokenizer.encode_batch([template.replace("{text}", t) for t in texts])]
    device = next(model.parameters()).device
    out = [0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            x, lengths = pad_batch([encoded[k] for k in chunk], pad, device)
            for k, p in zip(chunk, model(x, lengths=lengths).argmax(-1).tolist()):
                out[k] = int(p)
    finally:
        model.train(was_training)
    return out


def _load(checkpoint: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    from ..checkpoint import Checkpoint

    ckpt = Checkpoint.open(checkpoint)
    return ckpt.load_model(), ckpt.tokenizer(), ckpt.config


def evaluate_robustness(
    checkpoint: str | Path | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    texts: Sequence[str] = (),
    labels: Sequence[str] | None = None,
    task: str | None = None,
    method: Literal["auto", "head", "prompt"] = "auto",
    kind: str = "delete",
    rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
    seed: int = 0,
    k: int = 0,
    max_examples: int | None = None,
    batch_size: int = 16,
    mask_token: str = "<mask>",
    out_dir: str | Path | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """A model's metric at each noise rate of perturbation ``kind``.

    The model: ``checkpoint`` (a checkpoint or run directory), or ``model`` + ``tokenizer``.
    What is measured:

    - ``task`` (an embedded task name or task YAML): accuracy and macro-F1 on its test split
      (``max_examples`` first ones), by the checkpoint's classification head (``method=head``;
      labels and template from the checkpoint) or by ``k``-shot prompting with the task's
      template and verbalizers (``method=prompt``); ``auto`` uses the head when there is one;
    - ``texts`` with ``labels`` (label names): the same with a classification head;
    - ``texts`` alone: perplexity (``loss``, ``ppl``, ``bpb``, ``tokens``) of the perturbed texts.

    Returns ``{"kind", "seed", "metric", "method", "rows": [{"rate", ...metrics}], "table"}``
    (rows in increasing rate; ``table`` in markdown). With ``out_dir``: writes
    ``robustness.json``, ``robustness.md`` and ``robustness.png`` (metric against rate) there.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown perturbation {kind!r}; choose one of {', '.join(KINDS)}")
    rates = sorted({_check_rate(r) for r in rates})
    if not rates:
        raise ConfigError("give at least one noise rate")
    config: dict[str, Any] = {}
    if checkpoint is not None:
        if model is not None:
            raise ConfigError("give a checkpoint or a model, not both")
        model, tokenizer, config = _load(checkpoint)
    elif model is None or tokenizer is None:
        raise ConfigError("give a checkpoint, or a model and its tokenizer")

    label_names: list[str] = []
    gold: list[int] = []
    template = (config.get("run") or {}).get("classify", {}).get("template", "{text}")
    prompt_kwargs: dict[str, Any] = {}
    pool = None
    if task is not None:
        from ..data.tasks import load_task

        spec = load_task(task)
        examples = spec.test().examples[:max_examples] if max_examples else spec.test().examples
        texts = [e["text"] for e in examples]
        label_names = list(spec.labels)
        gold = [label_names.index(e["label"]) for e in examples]
        prompt_kwargs = spec.prompt_kwargs()
        pool = spec.train() if k else None
    elif labels is not None:
        if len(labels) != len(texts):
            raise ConfigError(f"{len(labels)} labels for {len(texts)} texts")
        label_names = list(config.get("labels") or sorted(set(labels)))
        unknown = sorted(set(labels) - set(label_names))
        if unknown:
            raise ConfigError(f"labels not known to the model: {', '.join(map(str, unknown[:5]))}")
        gold = [label_names.index(x) for x in labels]
    if not texts:
        raise ConfigError("nothing to evaluate: give texts (perplexity), texts and labels, or a task")

    classify = bool(label_names)
    if classify:
        has_head = bool(getattr(model.config, "num_labels", 0))
        if method == "auto":
            method = "head" if has_head else "prompt"
        if method == "prompt" and task is None:
            raise ConfigError("classification by prompting needs a task (its prompt template and verbalizers)")
        if method == "head":
            if not has_head:
                raise ConfigError("the model has no classification head; use method=prompt with a task")
            saved = config.get("labels")
            if saved and task is not None and list(saved) != label_names:
                raise ConfigError(f"the checkpoint's labels {saved} are not the task's {label_names}")
            if model.config.num_labels != len(label_names):
                raise ConfigError(f"the head has {model.config.num_labels} classes; the data has {len(label_names)} labels")
    else:
        method = "perplexity"

    rows = []
    for rate in rates:
        noisy = perturb_texts(texts, kind, rate, seed, mask_token)
        row: dict[str, Any] = {"rate": rate}
        if not classify:
            row.update(text_perplexity(model, tokenizer, noisy, batch_size=batch_size))
        else:
            from ..runs.metrics import classification_report

            if method == "head":
                pred = head_predictions(model, tokenizer, noisy, template, batch_size=batch_size)
            else:
                from .prompting import classify_by_prompting

                pred = classify_by_prompting(model, tokenizer, noisy, label_names, pool=pool, k=k, seed=seed,
                                             batch_size=batch_size, progress=False, **prompt_kwargs)
            rep = classification_report(gold, pred, label_names)
            row.update({"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"]})
        row["changed"] = sum(a != b for a, b in zip(noisy, texts)) / len(texts)
        rows.append(row)
        print(f"robustness {kind} rate {rate:.2f}: " + ", ".join(f"{k_}={v:.4f}" for k_, v in row.items() if k_ != "rate"))

    metric = "accuracy" if classify else "ppl"
    result = {"kind": kind, "seed": seed, "metric": metric, "method": method, "examples": len(texts),
              "rows": rows, "name": name or (str(checkpoint) if checkpoint is not None else "model")}
    result["table"] = format_table(result)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "robustness.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "robustness.md").write_text(result["table"] + "\n\n![metric against noise rate](robustness.png)\n")
        result["plot"] = str(plot_robustness({result["name"]: result}, out / "robustness.png"))
    return result


def format_table(result: dict[str, Any]) -> str:
    """A robustness result's rows as a markdown table."""
    keys = [k for k in result["rows"][0] if k != "rate"]
    lines = [f"| {result['kind']} rate | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in result["rows"]:
        cells = [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append(f"| {row['rate']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_robustness(results: dict[str, dict[str, Any]], path: str | Path, metric: str | None = None) -> Path:
    """One line per named result: its metric (default: the first result's) against the noise rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    metric = metric or first["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results.items():
        ax.plot([row["rate"] for row in r["rows"]], [row[metric] for row in r["rows"]], "o-", label=label, lw=1.5)
    ax.set_xlabel(f"{first['kind']} noise rate")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
