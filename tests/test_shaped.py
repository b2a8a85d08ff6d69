"""The uniform-shape search on synthetic targets: what it drops, lowers and keeps, and how a back-off snaps."""

from types import SimpleNamespace

from sieve_cli.shaped import Shape, attention_levels, shaped_kept, shaped_search, snapped


def targets(blocks=4, groups=4):
    return [SimpleNamespace(block=b, kind=kind, units=units) for b in range(blocks)
            for kind, units in (("mlp", 64), ("attention", groups))]


def removal_judge(units, harmless, mlp_cost, attention_cost, calls):
    """1 - cost of what is removed; the blocks in `harmless` cost nothing to drop, any other 0.1 more."""
    def judge(kepts, moves):
        calls.extend(moves)
        out = []
        for kept in kepts:
            loss = 0.0
            for t, p in zip(units, kept):
                if t.block in harmless and p == 0.0:
                    continue
                loss += (mlp_cost if t.kind == "mlp" else attention_cost) * (1 - p) + (0.05 if p == 0.0 else 0)
            out.append(1.0 - loss)
        return out
    return judge


def test_the_shaped_search_drops_harmless_blocks_then_lowers_the_shared_widths():
    units, calls = targets(), []
    grid = [i / 100 for i in range(1, 100)]
    shape, best = shaped_search(units, 0.9, grid, removal_judge(units, {1, 3}, 0.01, 0.02, calls), 0.95)
    assert shape.dropped == {1, 3}
    assert shape.mlp < 0.9 and shape.attention < 1.0
    kept = shaped_kept(units, shape)
    assert best == removal_judge(units, {1, 3}, 0.01, 0.02, [])([kept], ["x"])[0] and best >= 0.95
    assert len({p for t, p in zip(units, kept) if t.kind == "mlp" and t.block not in shape.dropped}) == 1
    assert calls[1:5] == [f"drop block {b}" for b in range(4)]  # one scan of each block alone


def test_a_costly_attention_stays_whole_and_a_costly_block_stays():
    units = targets()
    shape, _ = shaped_search(units, 0.9, [0.5, 0.8], removal_judge(units, set(), 0.05, 1.0, []), 0.95)
    assert shape.dropped == frozenset() and shape.attention == 1.0 and shape.mlp == 0.8


def test_a_back_off_snaps_back_to_a_uniform_shape():
    units = targets(blocks=3)
    kept = shaped_kept(units, Shape(0.5, 0.75, frozenset({2})))
    small = [k + 0.2 * (1 - k) for k in kept]  # the block stays dropped, the kinds stay shared
    assert snapped(units, small) == shaped_kept(units, Shape(0.6, 0.8, frozenset({2})))
    large = [k + 0.5 * (1 - k) for k in kept]  # the block comes back at its kind's level
    assert snapped(units, large) == shaped_kept(units, Shape(0.75, 0.875))


def test_attention_levels_are_whole_groups():
    assert attention_levels(targets(groups=3)) == [2 / 3, 1 / 3]
    assert attention_levels([SimpleNamespace(block=0, kind="mlp", units=8)]) == []
