import pytest
import torch
from torch import nn

from sieve_cli.lowrank import (
    LowRankLinear,
    fraction_for_rank,
    lowrank_params,
    rank_for_fraction,
    swap_modules,
)
from sieve_cli.pruned import lowrank_from_pair


@pytest.mark.parametrize("h, d", [(576, 576), (1536, 576), (192, 576), (7, 3)])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.25, 0.5, 0.9, 0.999])
def test_rank_keeps_at_most_p_and_is_the_largest_such_rank(h, d, p):
    r = rank_for_fraction(p, h, d)
    assert fraction_for_rank(r, h, d) <= p + 1e-12
    assert fraction_for_rank(r + 1, h, d) > p
    assert lowrank_params(r, h, d) == r * (h + d)


def test_dense_at_p_one():
    assert rank_for_fraction(1.0, 10, 10) is None
    assert fraction_for_rank(None, 10, 10) == 1.0 and lowrank_params(None, 10, 20) == 200


def test_lowrank_linear_computes_b_a_x_plus_bias():
    torch.manual_seed(0)
    B, A, bias = torch.randn(6, 2), torch.randn(2, 4), torch.randn(6)
    module = lowrank_from_pair(B, A, bias, torch.float32, torch.device("cpu"))
    x = torch.randn(5, 4)
    torch.testing.assert_close(module(x), x @ (B @ A).T + bias)
    assert sum(p.numel() for p in module.parameters()) == 2 * (6 + 4) + 6


def test_swap_and_restore():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    original = model[2][0]
    new = LowRankLinear(4, 2, 1)
    restore = swap_modules(model, {"2.0": new})
    assert model[2][0] is new
    restore()
    assert model[2][0] is original
