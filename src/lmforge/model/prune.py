"""Pruning: unstructured magnitude pruning and structured pruning that shrinks the model.

Methods (``prune_model(model, method, ratio)``):

* ``magnitude``: the ``ratio`` share of smallest-|w| weights of every ``nn.Linear`` under
  ``layers`` set to zero, per layer (each matrix loses the same share) or ``global`` (one
  threshold over all of them). Embeddings and the output head are left alone unless asked
  (``include_embeddings``, ``include_head``): their rows are looked up or scored directly,
  and zeroing them costs far more quality per weight. The zeros are stored in the (dense)
  checkpoint: the file and the decode speed stay the same without sparse kernels; the
  report gives the achieved sparsity.
* ``mlp``: the same number of hidden channels removed from every layer's MLP (rows of
  ``up_proj`` / both halves of ``gate_up_proj``, columns of ``down_proj``), so the config
  only changes ``intermediate_size``.
* ``heads``: whole attention heads removed, the same number in every layer. Under grouped-
  query attention a unit is one KV group (its key/value head with its query heads), so the
  head layout stays valid; ``ratio`` must remove a whole number of groups (the error lists
  the ratios that do). ``head_dim`` and the rotary tables are kept; the config gets
  ``n_head``, ``n_kv_head`` and an explicit ``head_dim``.

Importance of a structured unit (``importance``):

* ``activation`` (the default when calibration batches are given): removing MLP channel
  ``i`` changes the layer's output by exactly ``h_i * down[:, i]`` (``h`` = the input of
  ``down_proj``), so its cost is the expected squared norm of that term,
  ``E[h_i^2] * ||down[:, i]||^2``, measured over a few calibration batches. A head's cost is
  likewise ``E||y_h O_h^T||^2`` (``y_h`` = its attention output, ``O_h`` = its columns of
  ``o_proj``), summed over a KV group's query heads. When the output projection has a bias
  the mean of the removed term is folded into it, so the cost is the variance instead of
  the second moment.
* ``weight`` (no data needed): the product of the norms of the unit's weights
  (``||gate_i|| ||up_i|| ||down_i||``; for a group ``||V_g|| * sum_h ||O_h||``). It ignores
  how often a channel fires and the scale of the normalised inputs, so it is a proxy;
  BENCHMARKS.md ("Compression") compares the two on a trained model.

The pruned model is an ordinary :class:`~lmforge.model.gpt.GPT` of a smaller config: its
checkpoint loads, samples, serves, quantizes and exports like any other. ``config.json``
records what was done under ``"pruning"`` (a list, one entry per pruning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

METHODS = ("magnitude", "mlp", "heads")
IMPORTANCE = ("auto", "activation", "weight")
SCOPES = ("layer", "global")


# ------------------------------------------------------------------------------ checks
def check_settings(method: str, ratio: float, importance: str = "auto", scope: str = "layer") -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r} (choose {', '.join(METHODS)})")
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"the pruning ratio must be in (0, 1), got {ratio}")
    if importance not in IMPORTANCE:
        raise ConfigError(f"unknown importance {importance!r} (choose {', '.join(IMPORTANCE)})")
    if scope not in SCOPES:
        raise ConfigError(f"unknown magnitude scope {scope!r} (choose layer or global)")


def _check_plain(model: nn.Module) -> None:
    spec = getattr(model, "quantization", None)
    if spec:
        raise ConfigError(
            f"the model is quantized ({spec['method']}); prune its full-precision checkpoint, then quantize"
        )
    if getattr(model, "peft", None) is not None:
        raise ConfigError("the model carries an adapter; merge it first (lmforge merge), then prune")


# ------------------------------------------------------------------------------ magnitude
def magnitude_targets(
    model: nn.Module, include_embeddings: bool = False, include_head: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every matrix magnitude pruning zeroes."""
    found = [(f"layers.{n}.weight", m.weight) for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    if include_embeddings:
        found.append(("embed_tokens.weight", model.embed_tokens.weight))
    head = model._modules.get("lm_head")
    if include_head and isinstance(head, nn.Linear):  # a tied head is the embedding
        found.append(("lm_head.weight", head.weight))
    return found


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly ``k`` entries of the flat ``values`` with the smallest values
    (ties at the threshold taken in index order)."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k <= 0:
        return mask
    threshold = values.kthvalue(k).values
    mask = values < threshold
    need = k - int(mask.sum())
    if need > 0:
        mask[(values == threshold).nonzero().squeeze(1)[:need]] = True
    return mask


@torch.no_grad()
def magnitude_prune(
    model: nn.Module,
    ratio: float,
    scope: str = "layer",
    include_embeddings: bool = False,
    include_head: bool = False,
) -> dict[str, Any]:
    """Zero the ``ratio`` share of smallest-magnitude weights in place; returns the report."""
    check_settings("magnitude", ratio, scope=scope)
    _check_plain(model)
    targets = magnitude_targets(model, include_embeddings, include_head)
    if scope == "layer":
        for _, w in targets:
            flat = w.detach().abs().flatten()
            w.view(-1)[_smallest(flat, round(ratio * flat.numel()))] = 0
    else:
        flat = torch.cat([w.detach().abs().flatten().float() for _, w in targets])
        mask = _smallest(flat, round(ratio * flat.numel()))
        start = 0
        for _, w in targets:
            n = w.numel()
            w.view(-1)[mask[start : start + n]] = 0
            start += n
    zeros = sum(int((w == 0).sum()) for _, w in targets)
    total = sum(w.numel() for _, w in targets)
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "method": "magnitude",
        "ratio": ratio,
        "scope": scope,
        "targets": len(targets),
        "sparsity": zeros / total,  # of the pruned matrices
        "sparsity_all": all_zeros / all_params,  # of every parameter (norms, embeddings included)
        "params": all_params,
    }


# ------------------------------------------------------------------------------ calibration
@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[torch.Tensor], kind: str) -> list[dict[str, torch.Tensor]]:
    """Per-layer activation statistics over calibration ``batches`` of token ids.

    ``kind="mlp"``: ``sq`` = E[h_i^2] and ``mean`` = E[h_i] of every ``down_proj`` input
    channel. ``kind="heads"``: ``sq`` = E||y_h O_h^T||^2 per query head and ``mean`` = E[y]
    (the ``o_proj`` input, heads concatenated)."""
    stats: list[dict[str, Any]] = [{"sq": 0.0, "sum": 0.0, "n": 0} for _ in model.layers]
    hooks = []

    def mlp_hook(i: int):
        def hook(module, args):
            h = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = stats[i]
            s["sq"] = s["sq"] + h.square().sum(0)
            s["sum"] = s["sum"] + h.sum(0)
            s["n"] += h.shape[0]

        return hook

    def head_hook(i: int, attn: nn.Module):
        def hook(module, args):
            y = args[0].detach().float().reshape(-1, args[0].shape[-1])
            H, D = attn.n_head, attn.head_dim
            o = module.weight.detach().float().view(-1, H, D)  # (n_embd, H, D)
            contrib = torch.einsum("nhd,ehd->hne", y.view(-1, H, D), o)  # each head's share of the output
            s = stats[i]
            s["sq"] = s["sq"] + contrib.square().sum(dim=(1, 2))
            s["sum"] = s["sum"] + y.sum(0)
            s["n"] += y.shape[0]

        return hook

    for i, layer in enumerate(model.layers):
        if kind == "mlp":
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        else:
            hooks.append(layer.attn.o_proj.register_forward_pre_hook(head_hook(i, layer.attn)))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for x in batches:
            model(x)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ConfigError("no calibration batches")
    return [{"sq": s["sq"] / s["n"], "mean": s["sum"] / s["n"]} for s in stats]


# ------------------------------------------------------------------------------ structured
def _count(ratio: float, units: int, multiple_of: int = 1) -> int:
    """Units kept when removing ``ratio`` of ``units`` (kept count rounded to ``multiple_of``)."""
    keep = units - round(ratio * units)
    if multiple_of > 1:
        keep = max(multiple_of, multiple_of * round(keep / multiple_of))
    return keep


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with the given output rows / input columns of ``old``."""
    w = old.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _norm_rows(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    w = w.detach().float()
    if b is not None:
        w = torch.cat([w, b.detach().float()[:, None]], dim=1)
    return w.norm(dim=1)


def mlp_importance(mlp: nn.Module, stats: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """One score per hidden channel (higher = keep)."""
    down = mlp.down_proj.weight.detach().float()
    down_sq = down.square().sum(0)
    if stats is not None:
        second = stats["sq"]
        if mlp.down_proj.bias is not None:  # the mean is folded into the bias: only the variance is lost
            second = (second - stats["mean"].square()).clamp_(min=0)
        return second * down_sq
    hidden = down.shape[1]
    if mlp.kind == "swiglu":
        w, b = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
        gate = _norm_rows(w[:hidden], None if b is None else b[:hidden])
        up = _norm_rows(w[hidden:], None if b is None else b[hidden:])
        return gate * up * down_sq.sqrt()
    return _norm_rows(mlp.up_proj.weight, mlp.up_proj.bias) * down_sq.sqrt()


@torch.no_grad()
def _shrink_mlp(mlp: nn.Module, keep: torch.Tensor, stats: dict[str, torch.Tensor] | None) -> None:
    hidden = mlp.down_proj.in_features
    drop = torch.ones(hidden, dtype=torch.bool)
    drop[keep] = False
    down = mlp.down_proj
    if down.bias is not None and stats is not None and drop.any():  # keep the removed channels' mean output
        down.bias.add_(down.weight.detach()[:, drop].float() @ stats["mean"][drop].to(down.weight.device))
    if mlp.kind == "swiglu":
        mlp.gate_up_proj = _linear(mlp.gate_up_proj, rows=torch.cat([keep, keep + hidden]))
    else:
        mlp.up_proj = _linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _linear(down, cols=keep)


def head_importance(attn: nn.Module, stats: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """One score per KV group (higher = keep)."""
    H, G, D = attn.n_head, attn.n_kv_head, attn.head_dim
    rep = H // G
    if stats is not None:
        per_head = stats["sq"]
        if attn.o_proj.bias is not None:  # mean folded into the bias: subtract the mean's energy
            o = attn.o_proj.weight.detach().float().view(-1, H, D)
            mean_out = torch.einsum("hd,ehd->he", stats["mean"].view(H, D), o)
            per_head = (per_head - mean_out.square().sum(1)).clamp_(min=0)
        return per_head.view(G, rep).sum(1)
    q_dim = H * D
    v = attn.qkv_proj.weight.detach().float()[q_dim + G * D :].reshape(G, -1).norm(dim=1)
    o = attn.o_proj.weight.detach().float().view(-1, H, D).transpose(0, 1).reshape(H, -1).norm(dim=1)
    return v * o.view(G, rep).sum(1)


@torch.no_grad()
def _shrink_attn(attn: nn.Module, keep_groups: torch.Tensor, stats: dict[str, torch.Tensor] | None) -> None:
    H, G, D = attn.n_head, attn.n_kv_head, attn.head_dim
    rep = H // G
    heads = (keep_groups[:, None] * rep + torch.arange(rep)).flatten()  # query heads of the kept groups
    cols = (heads[:, None] * D + torch.arange(D)).flatten()
    kv = (keep_groups[:, None] * D + torch.arange(D)).flatten()
    q_dim, kv_dim = H * D, G * D
    o = attn.o_proj
    if o.bias is not None and stats is not None:
        drop = torch.ones(q_dim, dtype=torch.bool)
        drop[cols] = False
        o.bias.add_(o.weight.detach()[:, drop].float() @ stats["mean"][drop].to(o.weight.device))
    attn.qkv_proj = _linear(attn.qkv_proj, rows=torch.cat([cols, q_dim + kv, q_dim + kv_dim + kv]))
    attn.o_proj = _linear(o, cols=cols)
    attn.n_head, attn.n_kv_head = len(heads), len(keep_groups)
    attn.split = (len(heads) * D, len(keep_groups) * D, len(keep_groups) * D)


def head_ratios(n_kv_head: int) -> list[float]:
    """The ratios ``heads`` pruning accepts for a model with ``n_kv_head`` KV groups."""
    return [k / n_kv_head for k in range(1, n_kv_head)]


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return scores.topk(keep).indices.sort().values.cpu()


@torch.no_grad()
def structured_prune(
    model: nn.Module,
    method: str,
    ratio: float,
    *,
    calibration: list[torch.Tensor] | None = None,
    importance: str = "auto",
    multiple_of: int = 1,
) -> dict[str, Any]:
    """Remove MLP channels (``method="mlp"``) or KV groups of attention heads (``"heads"``)
    from every layer, in place; ``model.config`` becomes the smaller shape. Returns the report."""
    check_settings(method, ratio, importance)
    _check_plain(model)
    if method not in ("mlp", "heads"):
        raise ConfigError(f"{method!r} is not a structured pruning method (mlp or heads)")
    if importance == "auto":
        importance = "activation" if calibration else "weight"
    if importance == "activation" and not calibration:
        raise ConfigError("activation importance needs calibration data (--calib-data DIR of prepared shards)")
    if multiple_of < 1:
        raise ConfigError(f"multiple_of must be >= 1, got {multiple_of}")
    cfg = model.config
    before = sum(p.numel() for p in model.parameters())
    if method == "mlp":
        units = cfg.intermediate_size
        keep = _count(ratio, units, multiple_of)
        if keep >= units:
            raise ConfigError(f"ratio {ratio} removes no channel of {units}; use a larger ratio")
        if keep <= 0:
            raise ConfigError(f"ratio {ratio} would remove every MLP channel")
    else:
        G, rep = cfg.n_kv_head, cfg.n_head // cfg.n_kv_head
        removed = ratio * G
        if G == 1:
            raise ConfigError("the model has one KV group (multi-query attention): no head can be removed")
        if abs(removed - round(removed)) > 1e-6 or round(removed) in (0, G):
            valid = ", ".join(f"{r:.4g}" for r in head_ratios(G))
            unit = "heads" if rep == 1 else f"KV groups of {rep} query heads"
            raise ConfigError(
                f"head pruning removes whole {unit}: this model has {G}, so the ratio must be one of {valid} "
                f"(got {ratio})"
            )
        keep = G - round(removed)
    stats = collect_stats(model, calibration, method) if importance == "activation" else [None] * len(model.layers)
    for layer, st in zip(model.layers, stats):
        if method == "mlp":
            _shrink_mlp(layer.mlp, _keep_top(mlp_importance(layer.mlp, st), keep), st)
        else:
            _shrink_attn(layer.attn, _keep_top(head_importance(layer.attn, st), keep), st)
    if method == "mlp":
        model.config = dataclasses.replace(cfg, intermediate_size=keep)
        shape = {"intermediate_size": [units, keep]}
    else:
        n_head = keep * (cfg.n_head // cfg.n_kv_head)
        model.config = dataclasses.replace(cfg, n_head=n_head, n_kv_head=keep, head_dim=cfg.head_dim)
        shape = {"n_head": [cfg.n_head, n_head], "n_kv_head": [cfg.n_kv_head, keep]}
    after = sum(p.numel() for p in model.parameters())
    return {
        "method": method,
        "ratio": ratio,
        "importance": importance,
        "calibration_batches": len(calibration or []) if importance == "activation" else 0,
        "shape": shape,
        "params": [before, after],
    }


def prune_model(
    model: nn.Module,
    method: str,
    ratio: float,
    *,
    calibration: list[torch.Tensor] | None = None,
    importance: str = "auto",
    multiple_of: int = 1,
    scope: str = "layer",
    include_embeddings: bool = False,
    include_head: bool = False,
) -> dict[str, Any]:
    """Prune ``model`` in place with ``method`` (magnitude | mlp | heads); returns the report."""
    check_settings(method, ratio, importance, scope)
    if method == "magnitude":
        return magnitude_prune(model, ratio, scope, include_embeddings, include_head)
    return structured_prune(
        model, method, ratio, calibration=calibration, importance=importance, multiple_of=multiple_of
    )
