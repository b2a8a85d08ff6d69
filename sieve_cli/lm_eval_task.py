"""Export one part of a bound task as an lm-evaluation-harness task, so lm-eval scores sieve's examples.

sieve and lm-eval read the same kind of task YAML but pick different examples from it:
- splits: lm-eval scores a whole `test_split`; sieve scores its own seeded part (search or test,
  ids in WS/task/split.json) of one dataset;
- few-shot: lm-eval draws shots per example (a seeded random sampler over `fewshot_split`, or
  training/validation); sieve draws one pool per workspace (from `fewshot_split`, else from the
  calibration part) and every example gets the same first `num_fewshot` shots;
- description: lm-eval puts nothing between `description` and the first shot; sieve puts the
  fewshot_delimiter there.
The delimiters themselves (target " ", fewshot "\\n\\n") and the multiple-choice score (summed
log-likelihood of target_delimiter + choice, `acc`; per character, `acc_norm`) are the same.

So the export writes each example's context exactly as sieve renders it (description and
shots included) with its choices and gold index into a JSON-lines file, and a task YAML that
reads those fields verbatim with num_fewshot 0: lm-eval then scores the very strings sieve scores.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from .errors import TaskError
from .models import resolve_source
from .pruned import is_pruned_folder, read_sieve_json, require_modeling_file, verify_pruned_folder
from .tasks import BoundTask
from .workspace import Stage, Workspace


def lm_eval_task_name(bound: BoundTask, part: str) -> str:
    return f"sieve_{bound.name}_{part}"


def write_lm_eval_task(bound: BoundTask, part: str, folder: str | Path, limit: int | None = None) -> str:
    """Write `<name>.yaml` and `<name>.jsonl` into `folder`; returns the task name for `--tasks`.

    Use with: lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True
    --include_path FOLDER --tasks NAME --device cpu --batch_size 1
    """
    if bound.output_type != "multiple_choice":
        raise TaskError(f"task {bound.name} is {bound.output_type}; only multiple_choice tasks export to lm-eval")
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    name = lm_eval_task_name(bound, part)
    examples = bound.examples(part)[:limit]
    rows = [{"id": e.id, "context": e.context, "choices": list(e.choices), "gold": e.gold} for e in examples]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # field names, not templates: lm-eval reads them verbatim (a context may hold "{{")
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": bound.task.target_delimiter,
        "num_fewshot": 0,  # the shots are already in each context, chosen as sieve chose them
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return name


def lm_eval_model_args(ws: Workspace, model: str | None, dtype: str | None) -> dict[str, str]:
    """lm-eval's `--model_args` for the model `sieve eval --model MODEL --dtype DTYPE` scores.

    A pruned folder goes through its modeling file (trust_remote_code), so one that lost the file is
    refused here; the dtype is the one sieve would load (the folder's, or discover's for the dense model).
    """
    if model is None:
        discovered = ws.require(Stage.DISCOVER)["inputs"]["options"]
        source = resolve_source(discovered["model"])
        args = {"pretrained": source.location if source.kind == "hub" else source.folder}
        if source.gguf_file:
            args["gguf_file"] = source.gguf_file
        return args | {"dtype": dtype or discovered["dtype"]}
    folder = Path(model).expanduser().resolve()
    if is_pruned_folder(folder):
        standard = read_sieve_json(folder).get("standard")  # a width plan's: the family's own code loads it
        if not standard:
            require_modeling_file(folder)
        info = verify_pruned_folder(folder, required=True)  # vouch only for the files apply wrote
        if standard:
            return {"pretrained": str(folder), "dtype": dtype or info["dtype"]}
        return {"pretrained": str(folder), "trust_remote_code": "True", "dtype": dtype or info["dtype"]}
    return {"pretrained": str(folder), "dtype": dtype or "float32"}


def lm_eval_command(model_args: dict[str, str], folder: str | Path, name: str, device: str) -> str:
    """The shell command that scores the exported task `name` with lm-eval's Hugging Face backend."""
    joined = ",".join(f"{k}={v}" for k, v in model_args.items())
    words = ["lm_eval", "--model", "hf", "--model_args", joined, "--include_path", str(folder), "--tasks", name,
             "--device", device, "--batch_size", "1"]
    return " ".join(shlex.quote(w) for w in words)


__all__ = ["lm_eval_command", "lm_eval_model_args", "lm_eval_task_name", "write_lm_eval_task"]
