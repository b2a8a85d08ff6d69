"""Factor storage on SmolLM2-135M: bytes on disk and search's per-candidate swap time, old vs lean.

    python bench/factor_storage.py                    # workspace /tmp/fitws (captures sst2 there if needed)
    python bench/factor_storage.py -w WS --repeats 5

Computes the `output` bases once (float64, as `sieve fit` does) and saves them three ways:
`full float32` (every basis to rank min(H, D) in float32: what the old single
factors.safetensors held), `lean float32` and `lean bfloat16` (cut at the break-even rank
floor(HD / (H + D)), per-block shards). Prints the bytes of each beside the prunable
parameters' dense bytes. Then times what search does per candidate, `prune_in_memory` +
restore, for a few plans (uniform 0.9 / 0.75 / 0.5 and random per-matrix levels), side by
side in one process, interleaved: `old` reads the full float32 file at once and slices host
float32 per candidate (converted to the model's dtype on every swap); `lean` opens the index,
holds each matrix's lean factors once in the model's dtype (`keep_on`) and slices them.
Each row for float32 and bfloat16 models; the first lean candidate includes the lazy reads.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_speed import ensure_capture  # noqa: E402

from sieve_cli.factorize import gram_eigen, output_basis  # noqa: E402
from sieve_cli.factors import FactorSet  # noqa: E402
from sieve_cli.lowrank import rank_for_fraction  # noqa: E402
from sieve_cli.matrices import find_matrices, sites_of, weight_of  # noqa: E402
from sieve_cli.models import load_model, smollm2_gguf  # noqa: E402
from sieve_cli.pruned import prune_in_memory  # noqa: E402
from sieve_cli.store import read_site  # noqa: E402
from sieve_cli.workspace import Workspace  # noqa: E402

LEVELS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.25)


def full_bases(model, store: Path) -> FactorSet:
    factors = FactorSet("output")
    for site, members in sites_of(find_matrices(model)).items():
        C = read_site(store, site).gram
        eigen = gram_eigen(C) if any(m.out_features > m.in_features for m in members) else None
        for m in members:
            basis = output_basis(weight_of(model.get_submodule(m.name)).detach().double(), C, eigen)
            factors.full[m.name] = (basis.B.float(), basis.A.float())
            factors.blocks[m.name] = m.block
    return factors


def plans(matrices, count: int, seed: int = 0) -> list[dict]:
    """Rank per matrix (None: dense) for uniform 0.9 / 0.75 / 0.5 and random per-matrix levels."""
    rng = random.Random(seed)
    kept = [[p] * len(matrices) for p in (0.9, 0.75, 0.5)]
    kept += [[rng.choice(LEVELS) for _ in matrices] for _ in range(count - len(kept))]
    return [{m.name: rank_for_fraction(p, m.out_features, m.in_features) for m, p in zip(matrices, ks)} for ks in kept]


def swap_seconds(model, plan, factors) -> float:
    started = time.perf_counter()
    restore = prune_in_memory(model, plan, factors)
    restore()
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", default="/tmp/fitws")
    parser.add_argument("--tokens", type=int, default=20_000, help="calibration tokens when capturing here")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ws = Workspace(args.workspace)
    ensure_capture(ws, args.tokens)
    model, _ = load_model(str(smollm2_gguf()), "float32", "cpu")
    matrices = find_matrices(model)
    started = time.perf_counter()
    bases = full_bases(model, ws.capture_store)
    print(f"output bases for {len(matrices)} matrices in {time.perf_counter() - started:.1f} s")
    prunable = sum(m.out_features * m.in_features for m in matrices)

    root = Path(tempfile.mkdtemp(prefix="factor-storage-"))
    layouts = {"full float32": (torch.float32, False), "lean float32": (torch.float32, True),
               "lean bfloat16": (torch.bfloat16, True)}
    print(f"\nprunable parameters: {prunable:,} (dense float32 {prunable * 4 / 2**20:,.1f} MiB, "
          f"bfloat16 {prunable * 2 / 2**20:,.1f} MiB)")
    print(f"{'layout':<15}{'files':>6}{'MiB on disk':>13}{'x prunable params (same dtype)':>32}")
    for label, (dtype, lean) in layouts.items():
        folder = root / label.replace(" ", "-")
        folder.mkdir()
        files = bases.save(folder / "factors.json", dtype=dtype, lean=lean)
        size = folder_bytes(folder)
        print(f"{label:<15}{len(files):>6}{size / 2**20:>13.1f}{size / (prunable * dtype.itemsize):>32.3f}")
    del bases

    candidates = plans(matrices, args.candidates)
    print(f"\nper-candidate swap (prune_in_memory + restore), {len(candidates)} plans x {args.repeats} repeats, median ms")
    print(f"{'model dtype':<12}{'factors':<24}{'load s':>8}{'first ms':>10}{'median ms':>11}{'held MiB':>10}")
    for model_dtype in (torch.float32, torch.bfloat16):
        model = model.to(model_dtype)
        sets = {
            "old: full float32": lambda: FactorSet.load(root / "full-float32" / "factors.json").load_all(),
            "lean, model dtype": lambda: FactorSet.load(root / ("lean-float32" if model_dtype == torch.float32 else "lean-bfloat16")
                                                        / "factors.json").keep_on("cpu", model_dtype),
        }
        loaded, load_s, first, times = {}, {}, {}, {k: [] for k in sets}
        for label, open_set in sets.items():
            t = time.perf_counter()
            loaded[label] = open_set()
            load_s[label] = time.perf_counter() - t
            first[label] = swap_seconds(model, candidates[0], loaded[label])
        for _ in range(args.repeats):
            for plan in candidates:
                for label in sets:  # interleaved: both see the same machine load
                    times[label].append(swap_seconds(model, plan, loaded[label]))
        for label in sets:
            held = _held_bytes(loaded[label])
            print(f"{str(model_dtype).removeprefix('torch.'):<12}{label:<24}{load_s[label]:>8.2f}{first[label] * 1e3:>10.1f}"
                  f"{statistics.median(times[label]) * 1e3:>11.1f}{held / 2**20:>10.1f}")
        loaded.clear()


def _held_bytes(factors: FactorSet) -> int:
    held = getattr(factors, "_held", None)
    tensors = ([t for d in held.values() for t in d.values()] if held is not None
               else [t for pair in factors.full.values() for t in pair])
    return sum(t.numel() * t.element_size() for t in tensors)


if __name__ == "__main__":
    main()
