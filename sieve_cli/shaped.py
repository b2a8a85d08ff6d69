"""The uniform-shape search: width plans that the input family's own architecture can hold; pure.

Every MLP keeps one width, every attention module one number of key/value groups, and whole blocks may
go (a standard config with fewer layers): `sieve apply` then writes a standard folder that plain
`from_pretrained` loads. Nothing here touches a model: the caller judges kept lists through `judge`
(one batch at a time) and says which judged values are acceptable.

The search is coordinate-wise from the uniform MLP width: scan each block dropped alone, drop the
acceptable ones best first while the plan stays acceptable, lower the shared MLP width again by
bisection, then lower the attention by whole groups while that holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .acceptance import is_acceptable
from .uniform import binary_search

Judge = Callable[[list[list[float]], list[str]], list[float]]  # kept lists, move names -> judged metrics


@dataclass(frozen=True)
class Shape:
    mlp: float  # kept fraction of every MLP's neurons
    attention: float  # kept fraction of every attention module's key/value groups
    dropped: frozenset[int] = frozenset()  # blocks removed whole

    def to_dict(self) -> dict:
        return {"mlp": self.mlp, "attention": self.attention, "dropped": sorted(self.dropped)}


def shaped_kept(targets: Sequence, shape: Shape) -> list[float]:
    """The per-unit kept fractions of `shape` (0 for every unit of a dropped block)."""
    return [0.0 if t.block in shape.dropped else shape.mlp if t.kind == "mlp" else shape.attention for t in targets]


def snapped(targets: Sequence, kept: Sequence[float]) -> list[float]:
    """`kept` moved back to a uniform shape after the confirm part's back-off raised it toward dense.

    The back-off lifts a dropped block's units from 0 to t: the block stays dropped while t < 1/2 and
    otherwise comes back whole, at its kind's level (the largest kept of that kind among the blocks kept).
    """
    dropped = {t.block for t in targets} - {t.block for t, p in zip(targets, kept) if p >= 0.5}
    level = {kind: max([p for t, p in zip(targets, kept) if t.kind == kind and t.block not in dropped], default=1.0)
             for kind in {t.kind for t in targets}}
    return [0.0 if t.block in dropped else level[t.kind] for t in targets]


def attention_levels(targets: Sequence) -> list[float]:
    """The kept fractions an attention module can take by whole groups, most kept first (none: no attention)."""
    groups = {t.units for t in targets if t.kind == "attention"}
    if len(groups) != 1:
        return []
    units = groups.pop()
    return [k / units for k in range(units - 1, 0, -1)]


def droppable_blocks(blocks: Sequence[int], judged: Sequence[float], threshold: float) -> list[int]:
    """The blocks whose drop alone (`judged[i]` for `blocks[i]`) was acceptable, best judged first."""
    return [b for j, b in sorted(zip(judged, blocks), key=lambda x: (-x[0], x[1])) if is_acceptable(j, threshold)]


def shaped_search(targets: Sequence, mlp: float, grid: Sequence[float], judge: Judge,
                  threshold: float, log: Callable[[str], None] = lambda _: None
                  ) -> tuple[Shape, float | None]:
    """The most removing uniform shape found from the uniform MLP width `mlp`, and its judged metric
    (None: nothing beyond dense was acceptable); acceptable means `is_acceptable(judged, threshold)`."""
    shape, best = Shape(mlp, 1.0), None

    def acceptable(judged: float) -> bool:
        return is_acceptable(judged, threshold)

    def one(candidate: Shape, move: str) -> float:
        return judge([shaped_kept(targets, candidate)], [move])[0]

    if mlp < 1.0:
        best = one(shape, "uniform")  # the uniform answer, from the memo
    blocks = sorted({t.block for t in targets})
    singles = judge([shaped_kept(targets, replace(shape, dropped=frozenset({b}))) for b in blocks],
                    [f"drop block {b}" for b in blocks])
    held = droppable_blocks(blocks, singles, threshold)
    log(f"depth scan: {len(held)} of {len(blocks)} blocks can go alone (best first: {held[:8]})")
    for b in held:  # best first: the plan only ever grows by an acceptable block
        candidate = replace(shape, dropped=shape.dropped | {b})
        judged = one(candidate, f"drop block {b}")
        if acceptable(judged):
            shape, best = candidate, judged

    below = [g for g in grid if g < shape.mlp]
    if below:  # the shared MLP width again, now with the blocks gone (1.0 below: keep the current one)
        result = binary_search(below, lambda q: one(replace(shape, mlp=q), f"mlp {q:.2f}"), threshold)
        if result.p < 1.0:
            shape, best = replace(shape, mlp=result.p), result.metric

    for level in attention_levels(targets):  # whole groups: coarse, so one try per level, stop at a failure
        candidate = replace(shape, attention=level)
        judged = one(candidate, f"attention {level:.2f}")
        if not acceptable(judged):
            break
        shape, best = candidate, judged
    log(f"uniform shape: MLP kept {shape.mlp:.2f}, attention kept {shape.attention:.2f}, "
        f"{len(shape.dropped)} blocks dropped {sorted(shape.dropped)}")
    return shape, best

