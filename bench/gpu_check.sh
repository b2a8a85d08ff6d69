#!/usr/bin/env bash
# On a CUDA GPU, with Llama-3.1-8B-shaped blocks in bf16:
# 1. block-wise vs in-memory capture+fit: peak device memory (torch.cuda.max_memory_allocated)
#    against the printed estimate, equality of the factors, and seconds per block;
# 2. evaluation in memory vs streaming block by block vs spread with device_map=auto (half the
#    weights on the GPU, the rest in host memory): seconds, peak against the estimate that
#    search and eval print, and the same per-example scores (bench/stream_eval.py; its CPU run:
#    `python bench/stream_eval.py --device cpu --shape tiny --blocks 2`).
# Ready for a machine with a GPU; run from the repository root:
#
#     bash bench/gpu_check.sh            # 4 blocks of Llama-3.1-8B shape, bf16, 4096 tokens
#     BLOCKS=2 TOKENS=2048 bash bench/gpu_check.sh
#     PART=eval bash bench/gpu_check.sh  # only part 2 (PART=capture: only part 1)
#
# Each mode runs in its own process so the peaks do not mix. Exit status 1 when an
# estimate does not bound its measurement or two modes disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BLOCKS="${BLOCKS:-4}" TOKENS="${TOKENS:-4096}" FOLDER="${FOLDER:-/tmp/sieve-gpu-check}" PART="${PART:-all}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"

status=0
if [[ "$PART" == "all" || "$PART" == "eval" ]]; then
  echo "== evaluation: in memory vs streaming vs device_map=auto"
  python bench/stream_eval.py --device cuda --shape 8b --blocks "$BLOCKS" --sequences 64 --length 512 || status=1
fi
if [[ "$PART" == "eval" ]]; then exit "$status"; fi
echo "== capture+fit: block-wise vs in memory"

python - "$FOLDER" "$BLOCKS" <<'PY'
import sys, torch
from pathlib import Path
sys.path.insert(0, "bench")
from blockwise_memory import llama_config
from transformers import AutoModelForCausalLM
folder, blocks = Path(sys.argv[1]), int(sys.argv[2])
if not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists():
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_config(num_hidden_layers=blocks), dtype=torch.bfloat16).save_pretrained(folder)
PY

run_mode() {
python - "$FOLDER" "$TOKENS" "$1" <<'PY'
import json, sys, tempfile, time, torch
from pathlib import Path
from sieve_cli import memory
from sieve_cli.blockwise import capture_and_fit, open_runner
from sieve_cli.capture import CaptureOptions, capture_statistics
from sieve_cli.discover import diagnose
from sieve_cli.fit import FitOptions, fit_model, fit_site
from sieve_cli.models import load_model, meta_model
folder, tokens, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
options = CaptureOptions(tokens=tokens, batch_size=8, seq_len=512)
fit = FitOptions(device="cuda")
g = torch.Generator().manual_seed(0)
sequences = [torch.randint(0, 128256, (512,), generator=g).tolist() for _ in range(tokens // 512)]
shape = memory.ModelShape.from_discovery(diagnose(meta_model(folder)))
run = memory.RunShape(weight_bytes=2, compute_bytes=2, batch_size=8, seq_len=512, samples=4096, padded_tokens=tokens, device="cuda")
work = Path(tempfile.mkdtemp())
torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
if mode == "memory":
    estimate = max(memory.capture_in_memory(shape, run).total, memory.fit_in_memory(shape, run).total)
    model, _ = load_model(str(folder), "bfloat16", "cuda")
    capture_statistics(model, sequences, options, work / "s.zarr")
    factors, spectrum = fit_model(model, work / "s.zarr", fit)
else:
    estimate = memory.blockwise(shape, run).total
    result = capture_and_fit(open_runner(folder, torch.bfloat16, "cuda"), sequences, options, [fit], work / "w", fit_site)
    spectrum = result.spectra["output"]
seconds = time.perf_counter() - started
peak = torch.cuda.max_memory_allocated()
blocks = len({m.block for m in shape.matrices})
print(json.dumps({"mode": mode, "peak_bytes": peak, "estimate_bytes": estimate, "seconds": seconds,
                  "seconds_per_block": seconds / blocks, "spectrum": {k: v[:8] for k, v in spectrum.items()}}))
PY
}

memory_json="$(run_mode memory | tail -n 1)"
block_json="$(run_mode blockwise | tail -n 1)"
if python - "$memory_json" "$block_json" <<'PY'
import json, sys
import numpy as np
rows = [json.loads(a) for a in sys.argv[1:3]]
ok = True
for r in rows:
    bounded = r["peak_bytes"] <= r["estimate_bytes"]
    ok &= bounded
    print(f"{r['mode']:<10} peak {r['peak_bytes'] / 2**30:6.2f} GiB  estimate {r['estimate_bytes'] / 2**30:6.2f} GiB  "
          f"bounded {bounded}  {r['seconds']:.1f} s ({r['seconds_per_block']:.1f} s per block)")
a, b = rows[0]["spectrum"], rows[1]["spectrum"]
worst = max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)
print(f"largest spectrum difference between modes (first 8 ranks): {worst:.2e}")
ok &= worst < 1e-6
print(f"block-wise / in-memory time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}")
sys.exit(0 if ok else 1)
PY
then :; else status=1; fi
exit "$status"
