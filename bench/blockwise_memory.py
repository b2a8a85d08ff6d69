"""Block-wise vs in-memory capture+fit: peak memory against the printed estimate, and wall time.

    PYTHONPATH=$PWD python bench/blockwise_memory.py                # both parts
    PYTHONPATH=$PWD python bench/blockwise_memory.py --part llama8b # peak RSS only
    PYTHONPATH=$PWD python bench/blockwise_memory.py --part smollm2 # wall time only
    PYTHONPATH=$PWD python bench/blockwise_memory.py --part llama8b --shape 1b  # Llama-3.2-1B-shaped blocks

Part `llama8b`: a random-weight Llama with Llama-3.1-8B-shaped blocks (hidden 4096,
intermediate 14336, 32 heads, 8 key-value heads, vocabulary 128256, untied head) cut to
2 blocks, bf16, saved as a safetensors folder in /tmp (`--shape 1b`: Llama-3.2-1B-shaped blocks,
hidden 2048 and intermediate 8192, for a busy machine: the 8B-shaped fit costs about 15
CPU-minutes per block per mode). Each mode runs capture+fit (method
output) over --tokens random calibration tokens in its own subprocess with 1 thread; the
child reports its peak RSS (getrusage ru_maxrss), which is compared with the estimate that
`sieve_cli.memory` prints before the run (the in-memory one is the larger of its capture and
fit estimates: they are two stages). Also prints the estimates for the full Llama-3.1-8B
and 70B at 200k calibration tokens.

Part `smollm2`: SmolLM2-135M on sst2, the real stages (`run_capture` + `run_fit`) in two
workspaces, in-memory then block-wise, timed side by side in one run (1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80)


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": 32, **overrides})


def shape_of(config):
    """The estimate's view of a model: counted on the meta device, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from sieve_cli.discover import diagnose
    from sieve_cli.memory import ModelShape

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return ModelShape.from_discovery(diagnose(model))


def estimates(config, tokens: int, batch_size: int, seq_len: int, samples: int, dtype_bytes: int = 2) -> dict:
    from sieve_cli import memory

    shape = shape_of(config)
    run = memory.RunShape(weight_bytes=dtype_bytes, compute_bytes=dtype_bytes, batch_size=batch_size, seq_len=seq_len,
                          samples=samples, padded_tokens=tokens)
    capture, fit = memory.capture_in_memory(shape, run), memory.fit_in_memory(shape, run)
    return {"capture": capture, "fit": fit, "blockwise": memory.blockwise(shape, run),
            "in_memory_peak": max(capture.total, fit.total)}


# ---- part llama8b ---------------------------------------------------------------------------


def bench_config(shape: str):
    """The benchmark model: 2 blocks of Llama-3.1-8B shape, or (`--shape 1b`, for a busy
    machine: the 8B fit takes about 15 CPU-minutes per block) of Llama-3.2-1B shape."""
    if shape == "1b":
        return llama_config(num_hidden_layers=2, hidden_size=2048, intermediate_size=8192)
    return llama_config(num_hidden_layers=2)


def build(folder: Path, shape: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(bench_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(folder)


def sequences_for(tokens: int, seq_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, LLAMA_8B["vocab_size"], (seq_len,), generator=g).tolist() for _ in range(tokens // seq_len)]


def child(mode: str, folder: Path, tokens: int, seq_len: int, batch_size: int) -> None:
    """One mode's capture+fit; prints a JSON line with its peak RSS and times."""
    from sieve_cli.capture import CaptureOptions, capture_statistics
    from sieve_cli.fit import FitOptions, fit_model

    torch.set_num_threads(1)
    options = CaptureOptions(tokens=tokens, batch_size=batch_size, seq_len=seq_len)
    sequences = sequences_for(tokens, seq_len)
    work = Path(tempfile.mkdtemp(prefix=f"bw-{mode}-"))
    started = time.perf_counter()
    if mode == "memory":
        from transformers import AutoModelForCausalLM

        # what load_model does, without a tokenizer (the random model has none)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        capture_statistics(model, sequences, options, work / "stats.zarr")
        captured = time.perf_counter()
        factors, _ = fit_model(model, work / "stats.zarr", FitOptions())
    else:
        from sieve_cli.blockwise import capture_and_fit, open_runner
        from sieve_cli.fit import fit_site

        runner = open_runner(folder, torch.bfloat16, "cpu")
        result = capture_and_fit(runner, sequences, options, [FitOptions()], work / "blockwise", fit_site)
        captured = time.perf_counter()
        factors = result.factors["output"]
    factors.save(work / "factors.safetensors")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"mode": mode, "peak_rss": peak, "seconds": time.perf_counter() - started,
                      "capture_seconds": captured - started}))


def part_llama8b(args) -> None:
    from sieve_cli.memory import gib

    folder = Path(args.folder)
    if not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists():
        print(f"building the 2-block {args.shape}-shaped model in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--build", str(folder), args.shape], check=True)
    est = estimates(bench_config(args.shape), args.tokens, args.batch_size, args.seq_len, 4096)
    name = "Llama-3.2-1B" if args.shape == "1b" else "Llama-3.1-8B"
    print(f"model: 2 blocks of {name} shape (vocabulary 128256), bf16, {args.tokens} calibration tokens, batch {args.batch_size} x {args.seq_len}", flush=True)
    for key in ("capture", "fit", "blockwise"):
        print("  " + est[key].describe())
    measured = {}
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(args.tokens), str(args.seq_len),
                              str(args.batch_size)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{mode} run failed")
        row = measured[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        bound = est["in_memory_peak"] if mode == "memory" else est["blockwise"].total
        print(f"{mode:<10} peak RSS {gib(row['peak_rss'])}, estimate {gib(bound)}, bounded {row['peak_rss'] <= bound}, "
              f"{row['seconds']:.0f} s (capture {row['capture_seconds']:.0f} s)", flush=True)
    if len(measured) == 2:
        print(f"block-wise peak / in-memory peak: {measured['blockwise']['peak_rss'] / measured['memory']['peak_rss']:.2f}")


def full_size_estimates() -> None:
    from sieve_cli.memory import gib

    for name, config in (("Llama-3.1-8B", llama_config()), ("Llama-3.1-70B", llama_config(**LLAMA_70B))):
        full = estimates(config, 200_000, 32, 512, 4096)
        print(f"{name}, bf16, 200k tokens: in memory {gib(full['in_memory_peak'])} "
              f"({full['capture'].describe()}; {full['fit'].describe()})")
        block = full["blockwise"]
        print(f"    {block.describe()}")
        print("    (factors: lean, break-even rank in bf16, one block held at a time: each goes to its shard when fitted)")


# ---- part smollm2 ---------------------------------------------------------------------------


def part_smollm2(args) -> None:
    from sieve_cli.capture import CaptureOptions, run_capture
    from sieve_cli.discover import DiscoverOptions, run_discover
    from sieve_cli.fit import FitOptions, run_fit
    from sieve_cli.models import smollm2_gguf
    from sieve_cli.workspace import Workspace

    torch.set_num_threads(1)
    task = REPO / "examples" / "tasks" / "sst2.yaml"
    times, cpu = {}, {}
    for mode in ("memory", "blockwise") * args.rounds:
        ws = Workspace(tempfile.mkdtemp(prefix=f"bw-smollm2-{mode}-"))
        run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
        started, started_cpu = time.perf_counter(), time.process_time()
        run_capture(ws, CaptureOptions(task=str(task), tokens=args.smollm2_tokens, mode=mode))
        run_fit(ws, FitOptions(method="output"))
        times.setdefault(mode, []).append(time.perf_counter() - started)
        cpu.setdefault(mode, []).append(time.process_time() - started_cpu)
        print(f"SmolLM2 capture+fit {mode}: {times[mode][-1]:.1f} s wall, {cpu[mode][-1]:.1f} s CPU", flush=True)
    best = {mode: min(t) for mode, t in times.items()}
    best_cpu = {mode: min(t) for mode, t in cpu.items()}
    # the process CPU time (1 thread) is what the wall time would be on an idle machine
    print(f"SmolLM2-135M, sst2, {args.smollm2_tokens} tokens, 1 thread: in memory {best['memory']:.1f} s wall / "
          f"{best_cpu['memory']:.1f} s CPU, block-wise {best['blockwise']:.1f} s / {best_cpu['blockwise']:.1f} s, "
          f"ratio {best['blockwise'] / best['memory']:.2f} wall, {best_cpu['blockwise'] / best_cpu['memory']:.2f} CPU "
          f"(target <= 1.3)")


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        return build(Path(sys.argv[2]), sys.argv[3])
    if sys.argv[1:2] == ["--child"]:
        mode, folder, tokens, seq_len, batch_size = sys.argv[2:7]
        return child(mode, Path(folder), int(tokens), int(seq_len), int(batch_size))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "llama8b", "smollm2"), default="all")
    parser.add_argument("--shape", choices=("8b", "1b"), default="8b")
    parser.add_argument("--folder", default=None, help="default: /tmp/sieve-llama<shape>-2blocks")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--modes", default="blockwise,memory")
    parser.add_argument("--smollm2-tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    args.folder = args.folder or f"/tmp/sieve-llama{args.shape}-2blocks"
    torch.set_num_threads(1)
    if args.part in ("all", "smollm2"):
        part_smollm2(args)
    if args.part in ("all", "llama8b"):
        part_llama8b(args)
    full_size_estimates()


if __name__ == "__main__":
    main()
