"""Attention maps: the attention probabilities of every layer and head on one text.

:func:`capture_attention` runs the model once with an observer on each selected
``Attention`` module (``Attention.capture``, None on the normal path). The observer sees
the queries after RoPE, and the keys and values exactly as attended (prefix-tuning keys
first, GQA key/value heads repeated to the query heads), and recomputes
``softmax(q k^T / sqrt(d) + causal mask)`` in fp32. Every capture checks itself: the
probabilities times the values must give the module's own attention output
(``reconstruction_error``).

:func:`run_attention` (``lmforge attention CKPT "text"``) writes into one directory:
``layer{L}.png`` (one heatmap per head), ``overview.png`` (mean over heads, one panel per
layer), ``attention.html`` (self-contained viewer: pick a layer and head, hover a token to
see what it attends to), ``attention.json`` (tokens, top-k attended tokens per layer/head
and overall) and prints the overall table.

"Attention share" of a token: the attention it receives, averaged over all query
positions (causal queries that cannot see it give it 0), so the shares of one head sum to
1. The first position is usually an attention sink (heads park probability there); it is
flagged in per-head lists and left out of the overall ranking, its share reported apart.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError, LmforgeError

#: Heatmaps carry token labels on their axes up to this many tokens.
LABEL_TOKENS = 48
#: attention.html embeds at most this many probabilities (a few MB of JSON).
HTML_MAX_VALUES = 3_000_000
#: Captured probabilities (fp32) allowed in memory.
MAX_CAPTURE_BYTES = 2 << 30


@dataclass
class AttentionMaps:
    """Attention probabilities of one sequence.

    ``probs`` is (n_layers, n_head, T, S) for the ``layers`` captured: rows are the text's
    T tokens (queries), columns the S = P + T positions they may attend to, the P virtual
    tokens of a prompt- or prefix-tuned model first. ``reconstruction_error`` is the
    largest |probs @ V - attention output| over the captured layers."""

    probs: torch.Tensor
    layers: list[int]
    virtual: int = 0
    reconstruction_error: float = 0.0
    outputs: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d))`` under the causal mask, fp32: q (B, H, T, D), k (B, H, S, D)
    with S >= T (the first S - T keys, a prefix, are visible to every query) -> (B, H, T, S)."""
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * D**-0.5
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def capture_attention(
    model, ids: torch.Tensor | list[int], layers: list[int] | None = None, keep_outputs: bool = False
) -> AttentionMaps:
    """Attention probabilities of ``model`` on one sequence ``ids`` (T,) or (1, T).

    ``layers``: the layer indices to capture (default all). ``keep_outputs`` also keeps each
    layer's (q, k, v, attention output) as the module saw them (for checks)."""
    idx = torch.as_tensor(ids, dtype=torch.long)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise LmforgeError("capture_attention takes one non-empty sequence of token ids")
    n_layer = len(model.layers)
    layers = list(range(n_layer)) if layers is None else list(layers)
    P = int(getattr(model, "virtual_tokens", 0) or 0)
    soft = model._modules.get("soft_prompt") is not None
    captured: dict[int, torch.Tensor] = {}
    outputs: dict[int, tuple[torch.Tensor, ...]] = {}
    errors: list[float] = []

    def observer(i: int):
        def capture(q, k, v, y):
            p = attention_probs(q, k)  # (1, H, T', S)
            errors.append(float((torch.matmul(p, v.float()) - y.float()).abs().max()))
            if soft:  # the soft prompt's own rows are not the text's
                p = p[:, :, P:]
            captured[i] = p[0].cpu()
            if keep_outputs:
                outputs[i] = (q.cpu(), k.cpu(), v.cpu(), y.cpu())

        return capture

    was_training = model.training
    model.eval()
    try:
        for i in layers:
            model.layers[i].attn.capture = observer(i)
        model.hidden_states(idx.to(model.embed_tokens.weight.device))
    finally:
        for i in layers:
            model.layers[i].attn.__dict__.pop("capture", None)
        model.train(was_training)
    probs = torch.stack([captured[i] for i in layers])
    return AttentionMaps(probs, layers, P, max(errors, default=0.0), outputs)


# ---- selections and labels ----------------------------------------------------------------
def parse_indices(spec: str | None, n: int, what: str) -> list[int]:
    """``"0,3,5"`` or ``"2-4"`` (or None / "all": everything) -> sorted indices in [0, n)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--{what}: expected indices like 0,3 or 2-5, got {part!r}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo > hi:
            raise ConfigError(f"--{what}: empty range {part!r}")
        if hi >= n:
            raise ConfigError(f"--{what}: index {hi} is out of range (the model has {n} {what}: 0-{n - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def token_label(text: str) -> str:
    """A token's text made visible: spaces as ␣, newlines/tabs escaped, empty as ∅."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "␣")
    return text or "∅"


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "text"


# ---- statistics -------------------------------------------------------------------------------
def attention_share(p: torch.Tensor) -> torch.Tensor:
    """(..., T, S) probabilities -> (..., S): the attention each key position receives,
    averaged over the T queries (sums to 1)."""
    return p.mean(dim=-2)


def top_tokens(share: torch.Tensor, labels: list[str], k: int, skip_first: bool = False) -> list[dict[str, Any]]:
    """The ``k`` positions of ``share`` (S,) with the largest values, largest first."""
    order = torch.argsort(share, descending=True, stable=True).tolist()
    if skip_first:
        order = [j for j in order if j != 0]
    return [
        {"position": j, "token": labels[j], "share": round(float(share[j]), 6), "sink": j == 0}
        for j in order[:k]
    ]


def summarize(maps: AttentionMaps, heads: list[int], key_labels: list[str], top_k: int) -> dict[str, Any]:
    """Top-k attended tokens per layer/head, per layer (mean over heads) and overall."""
    sel = maps.probs[:, heads]  # (L, h, T, S)
    share = attention_share(sel)  # (L, h, S)
    per_layer = []
    for li, layer in enumerate(maps.layers):
        layer_share = share[li].mean(0)
        per_layer.append({
            "layer": layer,
            "top": top_tokens(layer_share, key_labels, top_k, skip_first=True),
            "first_token_share": round(float(layer_share[0]), 6),
            "heads": [
                {"head": h, "first_token_share": round(float(share[li, hi, 0]), 6),
                 "top": top_tokens(share[li, hi], key_labels, top_k)}
                for hi, h in enumerate(heads)
            ],
        })
    overall = share.mean(dim=(0, 1))
    return {
        "overall": {
            "top": top_tokens(overall, key_labels, top_k, skip_first=True),
            "first_token": key_labels[0],
            "first_token_share": round(float(overall[0]), 6),
        },
        "per_layer": per_layer,
    }


# ---- figures ---------------------------------------------------------------------------------
def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


class HeatmapGrid:
    """One figure of ``n`` heatmap panels (T queries x S keys) reused for every layer: the
    layout (labels, colorbar) is computed at the first save only, later saves swap the data."""

    def __init__(self, n: int, q_labels: list[str], k_labels: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import PowerNorm

        self.plt, self.np = plt, np
        T, S = len(q_labels), len(k_labels)
        labelled = S <= LABEL_TOKENS
        rows, cols = _grid(n)
        panel = max(3.0, 0.2 * S + 1.2) if labelled else 3.2
        self.fig, axes = plt.subplots(rows, cols, figsize=(cols * panel + 1.2, rows * panel * T / S + 0.9 + 0.4 * rows),
                                      squeeze=False, layout="constrained")
        self.axes = list(axes.flat)[:n]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # positions a query cannot see
        self.hidden = ~np.tri(T, S, S - T, dtype=bool)
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
        self.images = []
        for ax in self.axes:
            self.images.append(ax.imshow(np.zeros((T, S)), cmap=cmap, norm=norm, interpolation="nearest", aspect="auto"))
            ax.set_title(" ", fontsize=10)
            if labelled:
                size = 7 if S <= 32 else 5.5
                ax.set_xticks(range(S), k_labels, rotation=90, fontsize=size)
                ax.set_yticks(range(T), q_labels, fontsize=size)
            else:
                ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        self.title = self.fig.suptitle(" ", fontsize=11)
        self.fig.supxlabel("attended token (key)", fontsize=9)
        self.fig.supylabel("token (query)", fontsize=9)
        bar = self.fig.colorbar(self.images[0], ax=axes.ravel().tolist(), shrink=min(0.8, 0.35 + 0.1 * rows), pad=0.01)
        bar.set_label("attention probability (square-root scale)", fontsize=9)
        self.laid_out = False

    def save(self, mats: list[torch.Tensor], titles: list[str], suptitle: str, path: Path) -> None:
        for im, ax, mat, title in zip(self.images, self.axes, mats, titles):
            im.set_data(self.np.ma.masked_array(mat.float().numpy(), mask=self.hidden))
            ax.title.set_text(title)
        self.title.set_text(suptitle)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fig.savefig(path, dpi=100)
        if not self.laid_out:  # same labels on every page: keep the first layout
            self.fig.set_layout_engine("none")
            self.laid_out = True

    def close(self) -> None:
        self.plt.close(self.fig)


def plot_layers(maps: AttentionMaps, heads: list[int], q_labels, k_labels, out_dir: Path, progress: bool = False):
    """``layer{L}.png`` for every captured layer: one heatmap per head in ``heads``. Returns the paths."""
    from tqdm import tqdm

    grid = HeatmapGrid(len(heads), q_labels, k_labels)
    paths = []
    try:
        for li in tqdm(range(len(maps.layers)), desc="attention maps", unit="layer", disable=not progress, leave=False):
            layer = maps.layers[li]
            path = out_dir / f"layer{layer}.png"
            grid.save([maps.probs[li, h] for h in heads], [f"head {h}" for h in heads],
                      f"layer {layer}: attention of each head", path)
            paths.append(path)
    finally:
        grid.close()
    return paths


def plot_overview(maps: AttentionMaps, q_labels, k_labels, path: Path) -> None:
    """``overview.png``: the mean over heads of each captured layer, one panel per layer."""
    grid = HeatmapGrid(len(maps.layers), q_labels, k_labels)
    try:
        grid.save(list(maps.probs.mean(dim=1)), [f"layer {layer}" for layer in maps.layers],
                  "mean attention over heads, per layer", path)
    finally:
        grid.close()


# ---- HTML viewer ------------------------------------------------------------------------------
_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attention: __TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
#tokens{line-height:2.1em;margin:1em 0;max-width:70em}
.tok{padding:2px 3px;margin:1px;border-radius:3px;border:1px solid #ddd;cursor:pointer;white-space:pre;font-family:monospace}
.tok.q{outline:2px solid #d62728}
.virt{font-style:italic;color:#777}
#info{font-family:monospace;white-space:pre;min-height:8em}
canvas{border:1px solid #ccc;image-rendering:pixelated}
label{margin-right:1em}
small{color:#666}
</style></head><body>
<h2>Attention: <span id="ckpt"></span></h2>
<div><label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<small>hover a token (or a heatmap row) to see what it attends to; click to pin</small></div>
<div id="tokens"></div>
<div style="display:flex;gap:2em;align-items:flex-start">
<div><canvas id="map" width="400" height="400"></canvas><br><small>rows: tokens (queries), columns: attended
tokens; colour: sqrt(probability)</small></div>
<div id="info"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const P = D.virtual, T = D.tokens.length, S = P + T;
document.getElementById("ckpt").textContent = D.checkpoint;
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
D.layers.forEach((l, i) => layerSel.add(new Option("layer " + l, i)));
headSel.add(new Option("mean of heads", -1));
D.heads.forEach((h, i) => headSel.add(new Option("head " + h, i)));
const keys = D.key_tokens;
const box = document.getElementById("tokens");
const spans = keys.map((t, j) => {
  const s = document.createElement("span");
  s.className = "tok" + (j < P ? " virt" : "");
  s.textContent = t;
  s.title = "position " + j;
  if (j >= P) {
    s.addEventListener("mouseenter", () => { if (pinned < 0) show(j - P); });
    s.addEventListener("click", () => { pinned = pinned === j - P ? -1 : j - P; show(j - P); });
  }
  box.appendChild(s);
  return s;
});
let pinned = -1;
function row(i) {  // probabilities of query i over keys 0..P+i
  const li = +layerSel.value, hi = +headSel.value;
  if (hi >= 0) return D.attn[li][hi][i];
  const n = D.heads.length, out = new Array(P + i + 1).fill(0);
  for (let h = 0; h < n; h++) D.attn[li][h][i].forEach((v, j) => out[j] += v / n);
  return out;
}
function colour(v) {  // white -> dark blue on a sqrt scale
  const a = Math.sqrt(Math.max(0, Math.min(1, v)));
  const r = Math.round(255 - a * 225), g = Math.round(255 - a * 180), b = Math.round(255 - a * 60);
  return "rgb(" + r + "," + g + "," + b + ")";
}
function show(i) {
  const p = row(i);
  spans.forEach((s, j) => {
    s.style.background = j < p.length ? colour(p[j]) : "#fafafa";
    s.style.color = j < p.length && Math.sqrt(p[j]) > 0.6 ? "#fff" : "";
    s.classList.toggle("q", j === P + i);
  });
  const order = p.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0]).slice(0, 8);
  document.getElementById("info").textContent = "token " + i + " " + JSON.stringify(D.tokens[i]) +
    " attends to:\\n" + order.map(([v, j]) => (v * 100).toFixed(1).padStart(6) + "%  [" + j + "] " +
    keys[j]).join("\\n");
}
const canvas = document.getElementById("map"), ctx = canvas.getContext("2d");
const cell = Math.max(1, Math.floor(Math.min(600 / S, 600 / T, 24)));
canvas.width = S * cell; canvas.height = T * cell;
function draw() {
  ctx.fillStyle = "#eee"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < T; i++) row(i).forEach((v, j) => {
    ctx.fillStyle = colour(v); ctx.fillRect(j * cell, i * cell, cell, cell);
  });
  show(pinned >= 0 ? pinned : T - 1);
}
canvas.addEventListener("mousemove", e => {
  const i = Math.floor(e.offsetY / cell);
  if (pinned < 0 && i >= 0 && i < T) show(i);
});
layerSel.addEventListener("change", draw);
headSel.addEventListener("change", draw);
draw();
</script></body></html>
"""


def html_payload(maps: AttentionMaps, heads: list[int], tokens: list[str], key_labels: list[str],
                 checkpoint: str) -> dict[str, Any]:
    """The viewer's data: for each layer/head/query, its probabilities over the positions it can see."""
    P = maps.virtual
    attn = []
    for li in range(len(maps.layers)):
        per_head = []
        for h in heads:
            m = maps.probs[li, h]
            per_head.append([[round(x, 4) for x in m[i, : P + i + 1].tolist()] for i in range(m.shape[0])])
        attn.append(per_head)
    return {"checkpoint": checkpoint, "tokens": tokens, "key_tokens": key_labels, "virtual": P,
            "layers": maps.layers, "heads": heads, "attn": attn}


def write_html(payload: dict[str, Any], path: Path) -> None:
    from ..fileio import atomic_write_text

    data = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")
    title = re.sub(r"[<>&\"]", "", payload["checkpoint"])
    atomic_write_text(path, _HTML.replace("__TITLE__", title).replace("__DATA__", data))


# ---- the command ---------------------------------------------------------------------------------
def _prepare_ids(tokenizer, text: str, room: int, max_tokens: int | None) -> list[int]:
    if not text.strip():
        raise DataError("the text is empty")
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError("the text gives no tokens")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
        if max_tokens > room:
            raise ConfigError(f"--max-tokens {max_tokens} exceeds the model's context ({room} tokens)")
        if len(ids) > max_tokens:
            print(f"note: the text is {len(ids)} tokens; keeping the first {max_tokens} (--max-tokens)", file=sys.stderr)
            ids = ids[:max_tokens]
    elif len(ids) > room:
        raise DataError(
            f"the text is {len(ids)} tokens, longer than the model's context ({room} tokens); "
            f"pass --max-tokens N (at most {room}) to keep the first N"
        )
    return ids


def run_attention(
    checkpoint: str,
    text: str,
    *,
    out: str | Path | None = None,
    layers: str | None = None,
    heads: str | None = None,
    max_tokens: int | None = None,
    top_k: int = 5,
    chat: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    quantize: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Capture, plot and summarize the attention of ``checkpoint`` on ``text`` (see module doc).
    Returns the attention.json record (with ``out`` and the written ``files``)."""
    from ..checkpoint import Checkpoint
    from ..fileio import atomic_write_text

    if not text.strip():
        raise DataError("the text is empty")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    from ..hardware import inference_dtype

    inference_dtype(dtype, device)  # a bad value fails before the checkpoint loads
    ckpt = Checkpoint.open(checkpoint)
    path, model = ckpt.path, ckpt.load_model(device=device, quantize=quantize)
    # fp32 maps, except weight-quantized models where bf16 is fast (lmforge.hardware.inference_dtype)
    compute = inference_dtype(dtype, device, quantized=getattr(model, "quantization", None) is not None)
    if model.embed_tokens.weight.dtype != compute:
        model = model.to(compute)
    model.eval()
    cfg = model.config
    layer_ids = parse_indices(layers, cfg.n_layer, "layers")
    head_ids = parse_indices(heads, cfg.n_head, "heads")
    tokenizer = ckpt.tokenizer()
    if chat:
        text = ckpt.chat_template().render([{"role": "user", "content": text}], add_generation_prompt=True)
    P = int(getattr(model, "virtual_tokens", 0) or 0)
    ids = _prepare_ids(tokenizer, text, cfg.context_length - P, max_tokens)
    T, S = len(ids), P + len(ids)
    need = len(layer_ids) * cfg.n_head * T * S * 4
    if need > MAX_CAPTURE_BYTES:
        raise ConfigError(
            f"capturing {len(layer_ids)} layers x {cfg.n_head} heads x {T} x {S} probabilities needs "
            f"{need / 2**30:.1f} GiB; narrow it with --layers or --max-tokens"
        )
    maps = capture_attention(model, ids, layer_ids)

    tokens = [tokenizer.decode([i]) for i in ids]
    q_labels = [token_label(t) for t in tokens]
    virtual_kind = None
    if P:
        virtual_kind = "prompt" if model._modules.get("soft_prompt") is not None else "prefix"
    k_labels = [f"[v{j}]" for j in range(P)] + q_labels

    out_dir = Path(out) if out else Path("runs") / "attention" / slug(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("layer*.png"):
        if re.fullmatch(r"layer\d+\.png", stale.name):
            stale.unlink()
    files = plot_layers(maps, head_ids, q_labels, k_labels, out_dir, progress=verbose)
    plot_overview(maps, q_labels, k_labels, out_dir / "overview.png")
    files.append(out_dir / "overview.png")

    n_values = len(layer_ids) * len(head_ids) * (T * P + T * (T + 1) // 2)
    html_note = None
    if n_values <= HTML_MAX_VALUES:
        write_html(html_payload(maps, head_ids, tokens, k_labels, str(path)), out_dir / "attention.html")
        files.append(out_dir / "attention.html")
    else:
        html_note = (f"attention.html not written: {n_values:,} probabilities exceed {HTML_MAX_VALUES:,}; "
                     f"narrow with --layers, --heads or --max-tokens")

    record: dict[str, Any] = {
        "checkpoint": str(path),
        "text": text,
        "tokens": [{"position": P + i, "id": int(t), "text": s} for i, (t, s) in enumerate(zip(ids, tokens))],
        "virtual_tokens": P,
        "virtual_kind": virtual_kind,
        "layers": layer_ids,
        "heads": head_ids,
        "n_head": cfg.n_head,
        "n_kv_head": cfg.n_kv_head,
        "dtype": dtype,
        "share": "attention a token receives, averaged over all query tokens (a head's shares sum to 1)",
        "max_reconstruction_error": maps.reconstruction_error,
        "top_k": top_k,
        **summarize(maps, head_ids, k_labels, top_k),
    }
    if html_note:
        record["html_note"] = html_note
    atomic_write_text(out_dir / "attention.json", json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    files.append(out_dir / "attention.json")
    if verbose:
        print_table(record)
        if html_note:
            print(html_note)
        print(f"wrote {len(files)} files to {out_dir} (attention.json, overview.png, layer*.png"
              + (", attention.html)" if not html_note else ")"))
    record["out"] = str(out_dir)
    record["files"] = [str(f) for f in files]
    return record


def print_table(record: dict[str, Any]) -> None:
    o = record["overall"]
    n = len(record["tokens"])
    print(f"{n} tokens, layers {_span(record['layers'])}, heads {_span(record['heads'])}: "
          f"most attended tokens (share of attention, mean over layers and heads)")
    print(f"  first token {json.dumps(o['first_token'])} (attention sink, not ranked): {o['first_token_share']:.1%}")
    print(f"  {'rank':>4}  {'pos':>4}  {'share':>7}  token")
    for r, t in enumerate(o["top"], 1):
        print(f"  {r:>4}  {t['position']:>4}  {t['share']:>7.2%}  {t['token']}")


def _span(ids: list[int]) -> str:
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))
