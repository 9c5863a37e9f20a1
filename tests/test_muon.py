"""lmforge's Muon against torch.optim.Muon (torch 2.13): the same Newton-Schulz iterations and
update, exact in bf16 (torch's dtype), and within bf16 rounding of torch's in fp32 (the dtype
used where bf16 is emulated); checkpoints move between the two."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

from lmforge.train.optim import Muon, newton_schulz

COEFFS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
SHAPES = [(64, 32), (32, 96), (128, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_in_bf16_is_torchs_and_fp32_is_its_exact_iteration(shape) -> None:
    torch.manual_seed(0)
    g = torch.randn(*shape)
    theirs = torch_newton_schulz(g, COEFFS, 5, 1e-7)
    assert torch.equal(newton_schulz(g, COEFFS, 5, 1e-7, torch.bfloat16), theirs)
    exact = newton_schulz(g.double(), COEFFS, 5, 1e-7, torch.float64)
    ours = newton_schulz(g, COEFFS, 5, 1e-7, torch.float32)
    assert ours.dtype == torch.float32
    # fp32 follows the iteration to fp32 rounding; bf16 (torch's) to bf16 rounding, 2^-8 per
    # operation over 5 iterations: a few percent of the matrix's norm
    assert (ours.double() - exact).norm() / exact.norm() < 1e-5
    bf16_error = ((theirs.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < bf16_error < 0.04
    assert ((ours.double() - theirs.double()).norm() / exact.norm()).item() < 0.04


def _params(seed: int) -> list[torch.nn.Parameter]:
    """Matrices as in a model: several of one shape (lmforge orthogonalises those as one stack)."""
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in [*SHAPES, *SHAPES[:2]]]


def _steps(opt: torch.optim.Optimizer, params, n: int = 3) -> None:
    for i in range(n):
        torch.manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_the_update_is_torchs(adjust: str) -> None:
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn=adjust)
    a, b, c = _params(0), _params(0), _params(0)
    _steps(torch.optim.Muon(a, **kw), a)
    _steps(Muon(b, ns_dtype=torch.bfloat16, **kw), b)
    _steps(Muon(c, ns_dtype=torch.float32, **kw), c)
    for pa, pb, pc, start in zip(a, b, c, _params(0)):
        assert torch.equal(pa, pb)
        # fp32 iterations: the same update within bf16 rounding of its size
        moved = (pa - start).norm()
        assert (pc - pa).norm() / moved < 0.04


def test_state_moves_between_torch_and_lmforge() -> None:
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    a, b = _params(1), _params(1)
    theirs = torch.optim.Muon(a, **kw)
    _steps(theirs, a, 2)
    ours = Muon(b, ns_dtype=torch.bfloat16, **kw)
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # (torch shares the buffers otherwise)
    _steps(theirs, a, 1)
    _steps(ours, b, 1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
