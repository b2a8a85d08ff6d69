import pytest
import torch

from sieve_cli.errors import InputError
from sieve_cli.factors import FactorSet


def test_save_load_and_slicing(tmp_path):
    torch.manual_seed(0)
    B, A = torch.randn(6, 4), torch.randn(4, 5)
    fs = FactorSet("output", full={"m.q": (B, A)}, fixed={"m.k": {2: (torch.randn(3, 2), torch.randn(2, 5))}})
    fs.save(tmp_path / "f.safetensors")
    back = FactorSet.load(tmp_path / "f.safetensors")
    assert back.method == "output" and back.names() == ["m.q", "m.k"]
    b2, a2 = back.pair("m.q", 2)
    torch.testing.assert_close(b2, B[:, :2])
    torch.testing.assert_close(a2, A[:2])
    assert back.ranks("m.q") is None and back.ranks("m.k") == [2]
    torch.testing.assert_close(back.pair("m.k", 2)[0], fs.pair("m.k", 2)[0])
    with pytest.raises(InputError, match="has no factors of rank 3"):
        back.pair("m.k", 3)
    with pytest.raises(InputError, match="exceeds"):
        back.pair("m.q", 5)
