"""The plan, summarised: the kept-fraction grid and the sentences the report says about it."""

from __future__ import annotations

import numpy as np

from ..plan import Plan


def kept_grid(plan: dict) -> tuple[list[int], list[str], np.ndarray]:
    """(blocks, kinds, kept) with kept[k, b] the kept fraction of kind k in block b (nan: none)."""
    parsed = Plan(plan)
    kinds, by_block = parsed.kinds(), parsed.kept_by_block()
    blocks = list(by_block)
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for b, block in enumerate(blocks):
        for kind, kept in by_block[block].items():
            grid[kinds.index(kind), b] = kept
    return blocks, kinds, grid


def describe_plan(plan: dict) -> list[str]:
    """What the kept-fraction map says about which matrices the task needs, in sentences."""
    blocks, kinds, grid = kept_grid(plan)
    values = grid[~np.isnan(grid)]
    if values.size == 0:
        return ["The plan holds no matrices."]
    # a uniform plan's kept fractions differ only by rounding to whole ranks: no matrix is "needed more"
    if plan.get("strategy") == "uniform" or np.allclose(values, values[0]):
        kept = 1 - float(plan["params"]["removed_fraction_prunable"]) if "params" in plan else float(values.mean())
        what = "stays dense" if kept >= 1 else f"keeps about {kept:.0%} of its parameters (one fraction for all, rounded to whole ranks)"
        return [f"Uniform plan: every matrix {what}, so the map shows no bottleneck; "
                f"`sieve search --strategy adaptive` finds which matrices the task needs."]
    weights = _param_grid(plan, blocks, kinds)
    by_kind = _weighted_mean(grid, weights, axis=1)
    by_block = _weighted_mean(grid, weights, axis=0)
    dense = int(np.sum(values >= 1.0))
    findings = [
        kinds_sentence(kinds, by_kind),
        f"{dense} of {values.size} matrices stay dense" + (f": {_dense_list(blocks, kinds, grid)}." if 0 < dense <= 8 else "."),
    ]
    if len(blocks) >= 4:
        third = max(1, len(blocks) // 3)
        parts = [("first", by_block[:third]), ("middle", by_block[third:-third]), ("last", by_block[-third:])]
        findings.append("By depth, blocks keep " + ", ".join(f"{np.mean(v):.0%} in the {name} third" for name, v in parts if len(v)) + ".")
    else:
        findings.append("By block: " + ", ".join(f"block {b} keeps {v:.0%}" for b, v in zip(blocks, by_block)) + ".")
    return findings


def kinds_sentence(kinds: list[str], by_kind: np.ndarray) -> str:
    """Which kinds the task needs most and least, comparing the whole percentages the sentence prints:
    a kind is "most" only above the lowest, "least" only below the highest, never both."""
    percent = {k: int(round(v * 100)) for k, v in zip(kinds, by_kind) if not np.isnan(v)}
    high, low = max(percent.values()), min(percent.values())
    if high == low:
        return f"Every kind of matrix keeps {high}% of its parameters on average, so no kind stands out."
    ranked = sorted(percent, key=lambda k: -percent[k])  # stable: table order among equals
    most = [k for k in ranked if percent[k] > low][:2]
    least = [k for k in reversed(ranked) if percent[k] < high and k not in most][:2]
    return (f"The task needs {_join(most)} most (kept {_join(f'{percent[k]}%' for k in most)} of their parameters) "
            f"and {_join(least)} least ({_join(f'{percent[k]}%' for k in least)}).")


def _param_grid(plan: dict, blocks: list[int], kinds: list[str]) -> np.ndarray:
    weights = np.zeros((len(kinds), len(blocks)))
    for m in plan["matrices"].values():
        weights[kinds.index(m["kind"]), blocks.index(int(m["block"]))] = m.get("params_before", 1)
    return weights


def _weighted_mean(grid: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    filled = np.nan_to_num(grid)
    w = np.where(np.isnan(grid), 0.0, weights)
    total = w.sum(axis=axis)
    return np.divide((filled * w).sum(axis=axis), total, out=np.full(total.shape, np.nan), where=total > 0)


def _dense_list(blocks, kinds, grid) -> str:
    return ", ".join(f"{kinds[k]} of block {blocks[b]}" for k, b in zip(*np.nonzero(grid >= 1.0)))


def _join(items) -> str:
    items = list(items)
    return " and ".join(items) if len(items) <= 2 else ", ".join(items[:-1]) + " and " + items[-1]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points that no other point beats on both removal and metric, by increasing removal."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front[::-1]
