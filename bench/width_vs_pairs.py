"""Width vs low-rank pairs at equal parameters, on SmolLM2-135M's MLPs, side by side in one run.

For each share x of the MLP parameters removed (uniform across layers, attention untouched):
  pairs   every gate/up/down keeps the rank that keeps 1 - x of it (the output fit, today's format)
  width   every MLP keeps floor((1 - x) n) of its n neurons, in the structured-OBS keep order, with
          down refit by least squares (the width fit)
  no refit  the same neurons, down's kept columns as they were (what the refit adds)
Each cell: the test part's metric (examples neither capture nor search saw), the share of the
whole model removed, and the paired wins of width over pairs. Also: the prefill time of the
uniform-width model at 50% as a plain transformers model against dense, one thread, side by side.

    python bench/width_vs_pairs.py --task sst2 --removed 0.1,0.25,0.4,0.5

The workspace (capture with --tokens, output and width fits) is kept under --work, shared with
bench/search_quality.py's default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.search_quality import prepare_workspace  # noqa: E402
from sieve_cli.discover import load_workspace_model  # noqa: E402
from sieve_cli.evaluate import evaluate, prepare  # noqa: E402
from sieve_cli.fit import load_factors  # noqa: E402
from sieve_cli.narrowing import linear_like  # noqa: E402
from sieve_cli.pruned import build_replacements, count_params, prune_in_memory  # noqa: E402
from sieve_cli.search import rank_at, read_targets  # noqa: E402
from sieve_cli.tasks import bind_task  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402

log = logging.getLogger("bench")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--removed", default="0.1,0.25,0.4,0.5", help="shares of the MLP parameters removed")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sieve-bench-search"))
    ap.add_argument("--speed-tokens", type=int, default=512, help="prefill length of the speed check (0: skip)")
    return ap.parse_args()


def without_refit(model, widths: dict, factors) -> dict:
    """The width plan's modules with down's kept columns as they were (no least-squares refit)."""
    replacements = {}
    for unit in factors.width_units():
        width = widths.get(unit.name)
        if width is None:
            continue
        narrowed = build_replacements(model, {unit.name: width}, factors)
        out = model.get_submodule(unit.out)
        cols = factors.basis(unit.name).columns(width).to(out.weight.device)
        narrowed[unit.out] = linear_like(out, out.weight.detach()[:, cols], getattr(out, "bias", None))
        replacements |= narrowed
    return replacements


def score(model, prepared):
    result = evaluate(model, prepared, batch_size=16, show_progress=False)
    return result.value, result.per_example


def paired(a: list, b: list) -> tuple[int, int]:
    """Examples where a is right and b wrong, and the other way round."""
    return sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b))


def prefill_seconds(model, tokens: int, repeats: int = 5) -> float:
    ids = torch.randint(10, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - started)
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse()
    ws = Workspace(args.work / args.task)
    prepare_workspace(ws, args.task, args.tokens, fits=("output", "width"))
    model, tokenizer = load_workspace_model(ws, None, "cpu")
    prepared = prepare(bind_task(ws, None), "test", tokenizer)
    pairs_fit, width_fit = load_factors(ws, "output"), load_factors(ws, "width")
    matrices, total = read_targets(ws)
    mlp = [m for m in matrices if m.group == "mlp"]
    mlp_params = sum(m.params for m in mlp)
    dense, dense_scores = score(model, prepared)
    rows = []
    for x in map(float, args.removed.split(",")):
        ranks = {m.name: rank_at(m, 1 - x, pairs_fit) for m in mlp}
        widths = {u.name: u.level_for(1 - x) for u in width_fit.width_units() if u.kind == "mlp"}
        cells = {}
        for label, build in (("pairs", lambda: prune_in_memory(model, ranks, pairs_fit)),
                             ("width", lambda: prune_in_memory(model, widths, width_fit)),
                             ("no refit", lambda: _swap(model, without_refit(model, widths, width_fit)))):
            restore = build()
            try:
                value, scores = score(model, prepared)
                removed = 1 - count_params(model) / total
            finally:
                restore()
            cells[label] = {"test": value, "scores": scores, "removed_model": removed}
        wins = paired(cells["width"]["scores"], cells["pairs"]["scores"])
        rows.append({"mlp_removed": x, **{k: {"test": c["test"], "removed_model": c["removed_model"]}
                                          for k, c in cells.items()}, "width_vs_pairs_wins": wins})
        log.info("%s", rows[-1])
    speed = speed_check(ws, model, width_fit, args.speed_tokens) if args.speed_tokens else None
    out = args.work / args.task / "width_vs_pairs.json"
    out.write_text(json.dumps({"dense": dense, "rows": rows, "speed": speed, "examples": len(dense_scores)}, indent=2))
    render(args.task, dense, len(dense_scores), mlp_params / total, rows, speed)
    print(f"\nexact numbers: {out}")


def _swap(model, replacements):
    from sieve_cli.lowrank import swap_modules

    return swap_modules(model, replacements)


def speed_check(ws: Workspace, model, width_fit, tokens: int) -> dict:
    """Prefill of the 50%-MLP uniform width model, saved and loaded as a plain transformers model, vs dense."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from sieve_cli.apply import ApplyOptions, run_apply
    from sieve_cli.plan import Plan

    units = width_fit.width_units()
    widths = {u.name: u.level_for(0.5) if u.kind == "mlp" else None for u in units}
    plan = Plan.build(strategy="uniform", method="width", tolerance=0.0, absolute=False, matrices=units, ranks=widths,
                      model_total=read_targets(ws)[1], metric="-", dense=0.0, plan_metric=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        plan.save(Path(tmp) / "plan.json")
        run_apply(ws, ApplyOptions(out=Path(tmp) / "out", plan=Path(tmp) / "plan.json"), force=True)
        plain = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out").eval()
        ids = torch.randint(10, 1000, (1, 64), generator=torch.Generator().manual_seed(1))
        restore = prune_in_memory(model, widths, width_fit)
        with torch.no_grad():
            gap = (plain(ids).logits - model(ids).logits).abs().max().item()
        restore()
        dense_s, plain_s = [], []
        for _ in range(3):  # alternated, so both see the same machine load
            dense_s.append(prefill_seconds(model, tokens))
            plain_s.append(prefill_seconds(plain, tokens))
        return {"tokens": tokens, "dense_s": min(dense_s), "width_s": min(plain_s),
                "params_ratio": count_params(plain) / count_params(model), "max_logit_gap": gap}


def render(task, dense, n, mlp_share, rows, speed) -> None:
    print(f"\n{task}: test part ({n} examples), dense {dense:.3f}; the MLPs are {mlp_share:.1%} of the model")
    print(f"{'MLP removed':>11} {'of model':>9} {'pairs':>7} {'width':>7} {'no refit':>9} {'width vs pairs':>15}")
    for r in rows:
        w, p = r["width_vs_pairs_wins"]
        print(f"{r['mlp_removed']:>11.0%} {r['width']['removed_model']:>9.1%} {r['pairs']['test']:>7.3f} "
              f"{r['width']['test']:>7.3f} {r['no refit']['test']:>9.3f} {f'{w}-{p}':>15}")
    if speed:
        print(f"\nprefill of {speed['tokens']} tokens, 1 thread: dense {speed['dense_s']:.3f} s, uniform width "
              f"(50% of the MLP, plain from_pretrained) {speed['width_s']:.3f} s = {speed['width_s'] / speed['dense_s']:.2f}x "
              f"at {speed['params_ratio']:.2f}x the parameters; max |logit gap| vs sieve's in-memory model "
              f"{speed['max_logit_gap']:.1e}")


if __name__ == "__main__":
    main()
