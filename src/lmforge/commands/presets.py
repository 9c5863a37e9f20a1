"""`lmforge presets`: the named model shapes, with their parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(kw_only=True)
class PresetsConfig:
    pass


def run_presets(cfg: PresetsConfig) -> None:
    import torch

    from ..config import from_dict
    from ..model.gpt import GPT, GPTConfig
    from ..model.presets import PRESETS

    print(f"{'preset':<18}{'params':>10}  {'layers':>6} {'width':>6} {'heads':>6} {'kv':>4}  shape")
    for name in PRESETS:
        cfg = from_dict(GPTConfig, {"preset": name, **({} if "vocab_size" in PRESETS[name] else {"vocab_size": 65})})
        with torch.device("meta"):
            n = GPT(cfg).num_params()
        shape = f"{cfg.pos_embedding}/{cfg.norm}/{cfg.mlp}{'/tied' if cfg.tie_embeddings else ''}"
        print(f"{name:<18}{n / 1e6:>9.1f}M  {cfg.n_layer:>6} {cfg.n_embd:>6} {cfg.n_head:>6} {cfg.n_kv_head:>4}  {shape}")
