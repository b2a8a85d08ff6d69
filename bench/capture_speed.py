"""Capture speed and memory on SmolLM2-135M: capture time / bare forward time over the same batches.

    python bench/capture_speed.py [--tokens 16384] [--batch-size 16] [--seq-len 512] [--repeats 2]

Calibration text: sst2 sentences from the shared data (falls back to a fixed synthetic text).
Times are the minimum over repeats, run side by side (forward, backbone, capture, ...) in
one process with one thread. Peak memory is the process RSS sampled every 5 ms per phase.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sieve_cli.accumulate import backbone_of as _backbone
from sieve_cli.accumulate import pad_batch as _pad_batch
from sieve_cli.capture import CaptureOptions, capture_statistics
from sieve_cli.matrices import find_matrices, sites_of
from sieve_cli.models import load_model, smollm2_gguf
from sieve_cli.statistics import batches_of, cut_sequences

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


class PeakRSS:
    """Peak resident memory while the block runs, sampled from /proc."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def calibration_texts(limit: int = 20000) -> list[str]:
    if DATA.exists():
        with open(DATA, newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(rows)
            return [row[0] for _, row in zip(range(limit), rows)]
    return [f"sentence number {i}: the quick brown fox jumps over the lazy dog." for i in range(limit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(smollm2_gguf(), "float32", "cpu")
    ids = tokenizer(calibration_texts())["input_ids"]
    sequences, _ = cut_sequences(ids, args.seq_len, args.tokens)
    lengths = [len(s) for s in sequences]
    batches = [[sequences[i] for i in b] for b in batches_of(list(range(len(sequences))), lengths, args.batch_size)]
    tokens = sum(lengths)
    padded = sum(len(b) * max(map(len, b)) for b in batches)
    options = CaptureOptions(batch_size=args.batch_size, seq_len=args.seq_len, chunk_tokens=10**12, tokens=args.tokens)
    pad = tokenizer.pad_token_id
    backbone = _backbone(model)

    def forward(module):
        with torch.inference_mode():
            for b in batches:
                input_ids, mask = _pad_batch(b, pad, torch.device("cpu"))
                module(input_ids=input_ids, attention_mask=mask, use_cache=False)

    def capture(folder):
        capture_statistics(model, sequences, options, Path(folder) / "s.zarr", pad_id=pad, fresh=True)

    timings: dict[str, list[float]] = {"forward (full model)": [], "forward (backbone)": [], "capture (incl. 1 flush)": []}
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        forward(model)  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("forward (full model)", lambda: forward(model)), ("forward (backbone)", lambda: forward(backbone)), ("capture (incl. 1 flush)", lambda: capture(tmp))):
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    fn()
                    timings[name].append(time.perf_counter() - start)
                peaks[name] = max(peaks.get(name, 0), rss.peak)
        store_bytes = sum(p.stat().st_size for p in Path(tmp, "s.zarr").rglob("*") if p.is_file())

    sites = sites_of(find_matrices(model))
    gram_bytes = sum(g[0].in_features ** 2 * 8 for g in sites.values())
    base = min(timings["forward (full model)"])
    print(f"SmolLM2-135M, {tokens:,} tokens ({padded:,} with padding) in {len(batches)} batches of <= {args.batch_size}, "
          f"seq_len {args.seq_len}, threads {args.threads}, {len(sites)} sites; min of {args.repeats} runs")
    print(f"{'phase':<26}{'seconds':>10}{'tokens/s':>10}{'/ full fwd':>12}{'peak RSS MiB':>14}")
    for name, ts in timings.items():
        t = min(ts)
        print(f"{name:<26}{t:>10.2f}{tokens / t:>10.0f}{t / base:>12.3f}{peaks[name] / 2**20:>14.0f}")
    print(f"capture / backbone forward: {min(timings['capture (incl. 1 flush)']) / min(timings['forward (backbone)']):.3f}")
    print(f"float64 Gram matrices: {gram_bytes / 2**20:.0f} MiB; store on disk: {store_bytes / 2**20:.0f} MiB; "
          f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
