"""Streaming vs in-memory (vs spread) evaluation of one model: seconds, peak memory against the
estimate that search and eval print, and the per-example scores of each way compared.

    PYTHONPATH=$PWD python bench/stream_eval.py --device cpu --blocks 2 --shape tiny   # runs here, seconds
    PYTHONPATH=$PWD python bench/stream_eval.py --device cpu --shape 1b --blocks 6 --dtype float32 \
        --sequences 8 --length 64 --batch-size 4                                      # the CPU peaks, minutes
    PYTHONPATH=$PWD python bench/stream_eval.py --smollm2                             # the real stages, minutes

`--smollm2`: SmolLM2-135M on sst2 (4-shot), the real stages side by side in one process (1 thread):
`run_eval` on 100 test examples and a uniform `run_search` (32 search examples, grid 0.25) with
--mode memory and then --mode blockwise: seconds of each, the same per-example scores, the same plan.
    PYTHONPATH=$PWD python bench/stream_eval.py --device cuda                          # what gpu_check.sh runs

A random-weight Llama (`--shape 8b`: Llama-3.1-8B-shaped blocks, hidden 4096, intermediate 14336,
vocabulary 128256; `1b`: hidden 2048, intermediate 8192; `tiny`: hidden 64) cut to `--blocks`
blocks is saved as a bf16 safetensors folder (once, in --folder), and --sequences random token
sequences of --length tokens are scored as a text-modelling part (every position scored: the
heaviest logits an eval can need). Each way runs in its own subprocess so the peaks do not mix:
- memory: the whole model loaded on the device, `evaluate.evaluate`;
- streaming: `streaming.stream_evaluate`, one block's weights read at a time;
- spread (CUDA only): device_map="auto" with max_memory giving the GPU about half the model's
  weights and the rest to host memory, `evaluate.evaluate` through accelerate's hooks.
The peak is torch.cuda.max_memory_allocated on CUDA; on the CPU the peak anonymous resident memory
(RssAnon, sampled), beside getrusage's peak RSS, which also counts the clean pages of the memory-mapped
weight files read so far (streaming reads every block, so that RSS reaches the file's size). Exit
status 1 when an estimate does not bound its measurement or the scores disagree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def make_folder(folder: Path, shape: str, blocks: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=blocks, tie_word_embeddings=False,
                         max_position_embeddings=8192)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    save_tokenizer(folder)


def save_tokenizer(folder: Path) -> None:
    """load_model reads a tokenizer beside the weights; the scores here are token ids, so any will do."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)


def prepared_split(vocab: int, sequences: int, length: int):
    """Random sequences scored at every position (text modelling): no tokenizer needed."""
    import torch

    from sieve_cli.evaluate import PreparedSplit
    from sieve_cli.scoring import Sequence, Span
    from sieve_cli.tasks.render import Example

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (length - 8 * (i % 4) + 1,), generator=g).tolist() for i in range(sequences)]
    return PreparedSplit(task="random", part="test", output_type="text_modelling",
                         examples=[Example(str(i), "", "") for i in range(sequences)],
                         sequences=[Sequence(i, tuple(r[:-1]), (Span(0, tuple(r[1:])),)) for i, r in enumerate(rows)])


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 5 ms.

    ru_maxrss also counts the pages of the memory-mapped weight files that were read: clean
    file pages the kernel drops under pressure, and which streaming touches for every block.
    """

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def measure(args) -> dict:
    """One way, in this process: the estimate, the run, its peak and its scores."""
    import resource

    import torch

    from sieve_cli import memory
    from sieve_cli.discover import diagnose
    from sieve_cli.evaluate import evaluate
    from sieve_cli.models import load_model, meta_model
    from sieve_cli.streaming import open_streaming, stream_evaluate

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    model_shape = memory.ModelShape.from_discovery(diagnose(meta_model(folder)))
    prepared = prepared_split(model_shape.vocab, args.sequences, args.length)
    run = memory.scoring_run([len(s.tokens) for s in prepared.sequences], args.batch_size, args.dtype, args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    anonymous = AnonymousPeak()
    started = time.perf_counter()
    if args.way == "streaming":
        estimate = memory.scoring_streaming(model_shape, run, "eval", False)
        runner = open_streaming(folder, getattr(torch, args.dtype), args.device)
        result = stream_evaluate(runner, prepared, args.batch_size, show_progress=False)
    else:
        estimate = memory.scoring_in_memory(model_shape, run, "eval", False)
        max_memory = None
        if args.way == "spread":  # the GPU gets about half the weights: the rest must go to the host
            max_memory = {0: estimate.total - estimate.parts["weights"] // 2, "cpu": 2 * estimate.parts["weights"]}
        model, _ = load_model(str(folder), args.dtype, args.device, max_memory)
        result = evaluate(model, prepared, args.batch_size, show_progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.cuda.max_memory_allocated() if cuda else anonymous.stop()
    return {"way": args.way, "seconds": seconds, "peak_bytes": peak, "rss_bytes": rss, "estimate_bytes": estimate.total,
            "estimate": estimate.describe(), "blocks": len(model_shape.blocks), "soft": result.soft,
            "value": result.value}


def smollm2(data_root: str) -> int:
    """The real stages on SmolLM2: eval and a short uniform search, in memory then streamed."""
    import tempfile

    import torch

    from sieve_cli.capture import run_capture
    from sieve_cli.discover import run_discover
    from sieve_cli.evaluate import run_eval
    from sieve_cli.fit import run_fit
    from sieve_cli.models import smollm2_gguf
    from sieve_cli.options import CaptureOptions, DiscoverOptions, EvalOptions, FitOptions, SearchOptions
    from sieve_cli.search import run_search
    from sieve_cli.tasks import bind_task
    from sieve_cli.workspace import Workspace

    torch.set_num_threads(1)
    ws = Workspace(Path(tempfile.mkdtemp(prefix="sieve-stream-smollm2-")) / "ws")
    run_discover(ws, DiscoverOptions(model=str(smollm2_gguf())))
    bind_task(ws, "examples/tasks/sst2.yaml", data_root=data_root)
    run_capture(ws, CaptureOptions(tokens=4096))
    run_fit(ws, FitOptions())
    evals, plans, seconds = {}, {}, {}
    for mode in ("memory", "blockwise"):
        started = time.perf_counter()
        evals[mode] = run_eval(ws, EvalOptions(mode=mode, limit=100), force=True)
        seconds[f"eval {mode}"] = time.perf_counter() - started
        started = time.perf_counter()
        plan = run_search(ws, SearchOptions(mode=mode, limit=32, grid_step=0.25, allow_chance=True), force=True)
        seconds[f"search {mode}"] = time.perf_counter() - started
        plans[mode] = (plan["matrices"], plan["search"]["evaluations"], plan["metric"])
    same_scores = [e["score"] for e in evals["memory"]["per_example"]] == [e["score"] for e in evals["blockwise"]["per_example"]]
    for mode in ("memory", "blockwise"):
        print(f"{mode:<9} eval {seconds[f'eval {mode}']:6.1f} s ({evals[mode]['metric']} {evals[mode]['value']:.4f}, "
              f"{evals[mode]['n']} examples)   uniform search {seconds[f'search {mode}']:6.1f} s "
              f"({plans[mode][1]} evaluations)")
    print(f"same per-example scores: {same_scores}   same plan: {plans['memory'] == plans['blockwise']}   "
          f"streaming / memory: eval {seconds['eval blockwise'] / seconds['eval memory']:.2f}, "
          f"search {seconds['search blockwise'] / seconds['search memory']:.2f}")
    return 0 if same_scores and plans["memory"] == plans["blockwise"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=SHAPES, default="8b")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype (the files are bf16); float32 makes the loaded weights copies, "
                             "which the CPU's anonymous-memory peak then shows")
    parser.add_argument("--folder", default=None, help="default: /tmp/sieve-stream-eval-<shape>-<blocks>")
    parser.add_argument("--way", choices=("memory", "streaming", "spread"), help=argparse.SUPPRESS)  # the child
    parser.add_argument("--smollm2", action="store_true", help="the real stages on SmolLM2 and sst2 instead")
    parser.add_argument("--data-root", default="/work/shared/data")
    args = parser.parse_args()
    if args.smollm2:
        return smollm2(args.data_root)
    args.folder = args.folder or f"/tmp/sieve-stream-eval-{args.shape}-{args.blocks}"
    if args.way:
        print(json.dumps(measure(args)))
        return 0
    make_folder(Path(args.folder), args.shape, args.blocks)
    ways = ["memory", "streaming"] + (["spread"] if args.device.startswith("cuda") else [])
    rows = []
    for way in ways:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--way", way, "--folder", args.folder],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    ok = True
    reference = rows[0]["soft"]
    for r in rows:
        bounded = r["peak_bytes"] <= r["estimate_bytes"]
        worst = max(abs(a - b) for a, b in zip(r["soft"], reference))
        ok &= bounded and worst < 1e-2  # bf16: the padded and prefix paths round differently
        print(f"{r['way']:<9} {r['seconds']:7.2f} s ({r['seconds'] / r['blocks']:.2f} s per block)  peak "
              f"{r['peak_bytes'] / 2**30:6.2f} GiB (RSS with mapped files {r['rss_bytes'] / 2**30:.2f})  estimate {r['estimate_bytes'] / 2**30:6.2f} GiB  bounded {bounded}  "
              f"value {r['value']:.4f}  largest per-example difference from memory {worst:.1e}")
    print(f"streaming / memory time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
