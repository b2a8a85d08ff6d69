"""Stage apply: execute a plan, writing the pruned model to a folder outside the workspace.

The plan (from `search`, or a file given with --plan) names a rank per matrix. Each planned
matrix is stored in one of three ways:
  factored  a LowRankLinear (A then B): fewer parameters, and faster where the rank is low;
  product   a dense matrix holding B A, for a rank so high that two thin matmuls run slower
            than one dense one (kept fraction above `dense_above`): the model still computes
            exactly the map search evaluated, at dense speed and dense size;
  dense     rank null in the plan: the original matrix, untouched.
Parameter counts are counted from the built model; `--dry-run` predicts them from the plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .discover import load_workspace_model
from .errors import InputError
from .files import fresh_dir, open_no_follow, read_json, remove_path, sha256_file, sha256_json, write_json_atomic
from .fit import load_factors
from .heal import load_healed, load_healed_modules
from .lowrank import LowRankLinear, swap_modules
from .matrices import Matrix
from .models import load_tokenizer, local_folder, meta_model, resolve_source, torch_dtype
from .narrowing import shape_of
from .options import DENSE_ABOVE, ApplyOptions, resolved
from .plan import Plan, Ranks
from .pruned import (
    SIEVE_JSON,
    WEIGHTS,
    build_replacements,
    count_params,
    densify_in_place,
    is_pruned_folder,
    matrix_params,
    read_sieve_json,
    save_pruned,
)
from .standard import save_standard, standard_shape
from .taskhead import head_name, is_tied, task_head_of
from .tasks import load_bound_task
from .vocab import TaskVocabulary, model_special_ids, task_vocabulary
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.APPLY


# ---- pure: layout and predicted counts -------------------------------------------------------
# Targets are Matrix records (a rank each) or, for a width plan, WidthUnits (a width each); both
# answer kept_at, size_at and params.
def kept(target, rank: int | None) -> float:
    return target.kept_at(rank)


def factored_above_crossover(ranks: Ranks, matrices: Mapping[str, Matrix], layout: dict[str, str]) -> int:
    """How many factored matrices keep so much that they run slower than dense (see DENSE_ABOVE)."""
    return sum(1 for name, kind in layout.items()
               if kind == "factored" and kept(matrices[name], ranks[name]) > DENSE_ABOVE)


def storage_layout(ranks: Ranks, matrices: Mapping[str, Matrix], dense_above: float) -> dict[str, str]:
    """name -> "factored" | "product" | "dense" | "narrowed" (a width unit; see the module docstring)."""
    layout = {}
    for name, rank in ranks.items():
        if rank is None:
            layout[name] = "dense"
        elif matrices[name].level_key == "width":
            layout[name] = "narrowed"
        elif dense_above < 1.0 and kept(matrices[name], rank) > dense_above:
            layout[name] = "product"
        else:
            layout[name] = "factored"
    return layout


def predicted_prunable_after(ranks: Ranks, matrices: Mapping[str, Matrix], layout: dict[str, str]) -> int:
    def after(m) -> int:
        return m.size_at(ranks[m.name]) if layout[m.name] in ("factored", "narrowed") else m.params

    return sum(after(matrices[n]) for n in ranks)


def plan_targets(ws: Workspace, plan: Plan, matrices: dict[str, Matrix]) -> dict:
    """What the plan's names refer to: the prunable matrices, or the width fit's units."""
    if plan.method != "width":
        return matrices
    return {u.name: u for u in load_factors(ws, "width").width_units()}


def target_matrices(targets: Mapping, names) -> list[str]:
    """The matrix names behind the planned targets (a width unit's rows and out matrix)."""
    out = []
    for name in names:
        t = targets[name]
        out += [*(r for r, _ in t.rows), t.out] if t.level_key == "width" else [name]
    return out


# ---- inputs -------------------------------------------------------------------------------
def read_plan(ws: Workspace, options: ApplyOptions) -> tuple[Plan, Path]:
    if not options.plan:
        ws.require(Stage.SEARCH)  # names the command that writes the plan
        return Plan.load(ws.plan_json, rebuild=f"{ws.command_for(Stage.SEARCH)} --force"), ws.plan_json
    path = resolved(options.plan)
    if not path.is_file():
        raise InputError(f"no plan file at {path}; pass the plan.json that `sieve search` wrote")
    return Plan.load(path), path


def base_folder(ws: Workspace) -> Path | None:
    source = resolve_source(ws.require(Stage.DISCOVER)["inputs"]["options"]["model"])
    # a .gguf file is the input itself: OUT may sit beside it, but never replace it
    return None if source.kind == "hub" else resolved(source.location)


# ---- OUT: written only where sieve owns everything ----------------------------------------
# Files of a pruned folder written before sieve.json listed them (`files`).
LEGACY_FILES = frozenset({WEIGHTS, SIEVE_JSON, "config.json", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                          "added_tokens.json", "tokenizer.model", "chat_template.jinja"})


def guard_out(ws: Workspace, out: Path, base: Path | None, force: bool, inputs_sha: str) -> None:
    """Refuse any OUT whose replacement could delete what apply did not write.

    OUT may be missing, empty, or a pruned folder written by this workspace (or by the Python
    API) that holds nothing else; made from other inputs, it is replaced only with --force.
    The workspace and the input model are never inside, nor around, OUT.
    """
    if out == ws.root or ws.root in out.parents or out in ws.root.parents:
        raise InputError(f"output {out} overlaps the workspace {ws.root}; choose an -o outside the workspace")
    if base is not None and (out == base or base in out.parents):
        raise InputError(f"output {out} is inside the input model's folder {base}; choose another -o")
    if base is not None and out in base.parents:
        raise InputError(f"output {out} holds the input model's folder {base}; choose another -o")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; pass a folder with -o")
    if not out.is_dir() or not any(out.iterdir()):
        return
    info = read_sieve_json(out) if is_pruned_folder(out) else {}
    owned = set(info.get("files") or LEGACY_FILES) if info else set()
    foreign = sorted(name for name in os.listdir(out) if name not in owned)
    if foreign:
        raise InputError(f"output folder {out} is not empty: it holds files sieve did not write "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); sieve never deletes them: "
                         f"choose another -o, or move them away")
    owner = (info.get("apply") or {}).get("workspace")
    if owner not in (None, str(ws.root)):
        raise InputError(f"output folder {out} holds the pruned model of another workspace ({owner}); "
                         f"choose another -o, or delete it yourself if it is no longer needed")
    if not force and not made_from(out, inputs_sha):
        raise InputError(f"output folder {out} holds a pruned model made from another plan or options; "
                         f"pass --force to replace it or choose another -o")


def made_from(out: Path, inputs_sha: str) -> bool:
    if not is_pruned_folder(out):
        return False
    return (read_sieve_json(out).get("apply") or {}).get("inputs_sha256") == inputs_sha


@contextlib.contextmanager
def holding(out: Path) -> Iterator[None]:
    """Hold OUT for one apply: a second writer (another workspace or process) is refused, not interleaved.

    An advisory lock on `.OUT.lock` beside OUT, released when this apply ends or is killed; the file
    is removed when it ends (a killed apply's is taken over by the next one).
    """
    import fcntl

    lock = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = open_no_follow(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"output folder {out} is being written by another `sieve apply`; "
                             f"wait for it to finish, or choose another -o") from None
        try:
            if os.fstat(fd).st_ino == os.lstat(lock).st_ino:
                break  # still the file at that name: ours
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it after we opened it: lock the new one
    try:
        yield
    finally:
        Path(lock).unlink(missing_ok=True)  # before the release, so a waiter never holds a removed file
        os.close(fd)


def remove_abandoned(out: Path) -> None:
    """Remove the temporary copies (a whole model each) of an apply to OUT that was killed.

    Called under `holding(out)`, after the guards: no other apply to OUT is writing them. Names
    are matched literally (OUT's name is no pattern), so another writer's files are never touched.
    """
    for leftover in out.parent.iterdir():
        for kind in ("tmp", "old"):
            prefix = f".{out.name}.{kind}-"
            if leftover.name.startswith(prefix) and leftover.name[len(prefix):].isdigit():
                log.info("removing %s, left by an interrupted apply", leftover)
                remove_path(leftover)


# ---- the stage ----------------------------------------------------------------------------
def run_apply(ws: Workspace, options: ApplyOptions, force: bool = False) -> dict:
    """Build the plan's pruned model and save it to `options.out`; returns the numbers.

    Re-running with unchanged inputs while OUT still holds the result does nothing.
    """
    discover = ws.require(Stage.DISCOVER)
    found = read_json(ws.matrices_json, rebuild=ws.command_for(Stage.DISCOVER) + " --force")
    matrices = {m["name"]: Matrix.from_dict(m) for m in found["matrices"]}
    if options.healed and options.plan:
        raise InputError("--healed builds the workspace plan's healed model; it cannot take --plan "
                         "(heal that plan in its own workspace)")
    stage = Stage.apply(options.healed)
    plan, plan_path = read_plan(ws, options)
    matrices = plan_targets(ws, plan, matrices)
    ranks = plan.checked_against(matrices, str(plan_path))
    method = plan.method
    upstream = ws.upstream_hashes(Stage.DISCOVER, *([] if options.plan else [Stage.SEARCH]), Stage.fit(method),
                                  *([Stage.HEAL] if options.healed else []),
                                  *([Stage.TASK] if options.vocab == "task" else []))
    inputs = {"options": options.recorded(), "upstream": upstream, "plan_sha256": sha256_file(plan_path)}
    layout = storage_layout(ranks, matrices, options.dense_above)
    slow = factored_above_crossover(ranks, matrices, layout)
    if options.dry_run:
        return predict(found, ranks, matrices, layout, options, plan, predicted_vocab(ws, options)) | {
            "factored_above_crossover": slow}

    out, inputs_sha = resolved(options.out), sha256_json(inputs)
    # `sieve run` (replace_stale) may replace a pruned model that this workspace wrote earlier
    ours = ws.replace_stale and (ws.read_manifest(stage) or {}).get("summary", {}).get("out") == str(out)
    guard_out(ws, out, base_folder(ws), force or ours, inputs_sha)  # before anything is created beside OUT
    with holding(out):
        guard_out(ws, out, base_folder(ws), force or ours, inputs_sha)  # again: another apply may have written it
        remove_abandoned(out)
        if not ws.begin(stage, inputs, force) and made_from(out, inputs_sha):
            log.info("apply is up to date: %s was built from the same plan and options", out)
            return {**read_json(ws.apply_result_of(stage)), "up_to_date": True}
        if discover["inputs"]["options"]["dtype"] != options.dtype:
            log.warning("search scored the model in %s; in %s the metric can differ slightly",
                        discover["inputs"]["options"]["dtype"], options.dtype)
        result = build_and_save(ws, ranks, layout, plan, method, options, out, inputs_sha, matrices)
    result |= {"factored_above_crossover": slow}
    write_json_atomic(ws.apply_result_of(stage), result)
    ws.finish(stage, inputs, [ws.apply_result_of(stage)], summary={k: result[k] for k in ("out", "params_after", "params_ratio", "file_bytes")})
    return result


def build_and_save(ws: Workspace, ranks, layout, plan, method, options: ApplyOptions, out: Path, inputs_sha: str,
                   targets: Mapping) -> dict:

    model, tokenizer = load_workspace_model(ws, options.dtype, "cpu")
    names = target_matrices(targets, ranks)
    params_before, prunable_before = count_params(model), matrix_params(model, names)
    healed_width = options.healed and method == "width"  # healed: the narrowed modules' trained weights
    factors = load_healed(ws) if options.healed and not healed_width else load_factors(ws, method)
    densify_in_place(model, {n: ranks[n] for n in ranks if layout[n] == "product"}, factors)
    swapped = build_replacements(model, {n: ranks[n] for n in ranks if layout[n] in ("factored", "narrowed")}, factors)
    swap_modules(model, swapped)
    if healed_width:
        load_healed_modules(ws, model)
    vocab = install_task_head(ws, model, tokenizer, options.vocab_extra) if options.vocab == "task" else None
    stored_dense = sorted(n for n in ranks if layout[n] == "product")
    extra = {"apply": {"dense_above": options.dense_above, "stored_as_product": stored_dense, "inputs_sha256": inputs_sha,
                       "workspace": str(ws.root)},
             "healed": heal_record(ws) if options.healed else None}
    narrowed = {name: shape_of(module) for name, module in swapped.items() if not isinstance(module, LowRankLinear)}
    shape = standard_shape(model, list(targets.values()), ranks) if method == "width" else None
    if shape is not None and vocab is not None:
        log.info("a standard folder cannot hold a task vocabulary's head: writing the custom folder "
                 "(modeling_sieve.py, trust_remote_code) instead")
        vocab["standard_fallback"] = True
        shape = None
    if shape is not None:
        extra["standard"] = shape.describe()
        writer = lambda folder: save_standard(model, folder, shape, plan.data,  # noqa: E731
                                              ws.require(Stage.DISCOVER)["inputs"]["model"], tokenizer, extra,
                                              quantize=options.quantize)
    else:
        writer = lambda folder: save_pruned(model, folder, plan.data,  # noqa: E731
                                            ws.require(Stage.DISCOVER)["inputs"]["model"], tokenizer,
                                            fit_method=method, extra=extra, quantize=options.quantize, narrowed=narrowed,
                                            vocab=vocab)
    write_folder(out, writer)
    params_after, prunable_after = count_params(model), matrix_params(model, names)
    result_standard = extra.get("standard")
    file_bytes = (out / WEIGHTS).stat().st_size
    nbytes = torch_dtype(options.dtype).itemsize
    return numbers(params_before, params_after, prunable_before, prunable_after, file_bytes, nbytes, layout,
                   plan, options, out, predicted=False, vocab=vocab) | {"standard": result_standard}


# ---- --vocab task ----------------------------------------------------------------------------
def refuse_softcapping(config) -> None:
    """Gemma 2 caps the logits after the head (tanh): a very negative logit would come back as -cap."""
    if getattr(config, "final_logit_softcapping", None):
        raise InputError(f"--vocab task cannot restrict the head of a {config.model_type} model: it caps the logits "
                         f"after the head (final_logit_softcapping), so the ids left out would keep a probability; "
                         f"use --vocab full")


def choose_vocab(ws: Workspace, tokenizer, vocab_size: int, extra: int, special) -> TaskVocabulary:
    return task_vocabulary(load_bound_task(ws), tokenizer, vocab_size, extra, special)


def install_task_head(ws: Workspace, model, tokenizer, extra: int) -> dict:
    """Put the task vocabulary's TaskHead in place of the model's head; returns what sieve.json records."""
    refuse_softcapping(model.config)
    head = model.get_output_embeddings()
    vocab_size, hidden = head.weight.shape
    chosen = choose_vocab(ws, tokenizer, vocab_size, extra, model_special_ids(model))
    tied = is_tied(model, head)
    removed = 0 if tied else (vocab_size - len(chosen.ids)) * (hidden + (head.bias is not None))
    swap_modules(model, {head_name(model): task_head_of(model, chosen.ids)})
    return chosen.record() | {"tied": tied, "head_params_removed": removed, "standard_fallback": False}


def predicted_vocab(ws: Workspace, options: ApplyOptions) -> dict | None:
    """A dry run's task vocabulary: the kept ids from the tokenizer, the head's shape from the meta model."""
    if options.vocab != "task":
        return None
    source = ws.require(Stage.DISCOVER)["inputs"]["options"]["model"]
    folder = local_folder(source, create=False)
    if folder is None:
        raise InputError("a dry run with --vocab task reads the model's config from its local files, which are not "
                         "there yet; run `sieve apply` without --dry-run")
    model = meta_model(folder)
    refuse_softcapping(model.config)
    head = model.get_output_embeddings()
    vocab_size, hidden = head.weight.shape
    chosen = choose_vocab(ws, load_tokenizer(source), vocab_size, options.vocab_extra, model_special_ids(model))
    tied = is_tied(model, head)
    removed = 0 if tied else (vocab_size - len(chosen.ids)) * (hidden + (head.bias is not None))
    return {k: v for k, v in chosen.record().items() if k != "ids"} | {"tied": tied, "head_params_removed": removed}


def heal_record(ws: Workspace) -> dict:
    """What sieve.json says of the healing: heal's summary (loss, steps, ...); the report labels the model by it."""
    return dict((ws.require(Stage.HEAL).get("summary") or {}))


def write_folder(out: Path, write) -> None:
    """Write into a temporary sibling, then swap it into place, so a crash leaves no half model.

    Called under `holding(out)` after `guard_out`: an OUT that exists holds only our own output.
    """
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        write(fresh_dir(tmp))  # a link planted at the name is removed, never written through
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)
        os.replace(tmp, out)  # onto a missing or empty folder
    finally:
        remove_path(tmp)
        remove_path(old)


def predict(matrices_json: dict, ranks: Ranks, matrices: Mapping[str, Matrix], layout, options: ApplyOptions,
            plan: Plan, vocab: dict | None = None) -> dict:
    """The numbers apply would print, from the plan and discover's counts, without loading anything."""
    prunable_before = sum(matrices[n].params for n in ranks)
    prunable_after = predicted_prunable_after(ranks, matrices, layout)
    params_before = matrices_json["total_params"]
    params_after = params_before - prunable_before + prunable_after - (vocab or {}).get("head_params_removed", 0)
    nbytes = torch_dtype(options.dtype).itemsize
    return numbers(params_before, params_after, prunable_before, prunable_after, params_after * nbytes, nbytes,
                   layout, plan, options, resolved(options.out), predicted=True, vocab=vocab)


def numbers(params_before, params_after, prunable_before, prunable_after, file_bytes, nbytes, layout, plan,
            options: ApplyOptions, out: Path, predicted: bool, vocab: dict | None = None) -> dict:
    kinds = ("narrowed", "dense") if plan.method == "width" else ("factored", "product", "dense")
    counts = {kind: sum(1 for v in layout.values() if v == kind) for kind in kinds}
    dense_bytes = params_before * nbytes
    return {
        "out": str(out),
        "dry_run": options.dry_run,
        "predicted": predicted,
        "method": plan.method,
        "dtype": options.dtype,
        "quantize": options.quantize,
        "healed": options.healed,
        "dense_above": options.dense_above,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "removed_fraction_model": 1 - params_after / params_before,
        "prunable_before": prunable_before,
        "prunable_after": prunable_after,
        "removed_fraction_prunable": 1 - prunable_after / prunable_before if prunable_before else 0.0,
        "plan_params_after": plan.params.get("model_after"),
        "file_bytes": file_bytes,
        "dense_file_bytes": dense_bytes,
        "size_ratio": file_bytes / dense_bytes,
        "matrices": counts,
        # --vocab task: kept ids, their sources, tied, head_params_removed (ids only in the folder's vocab file)
        "vocab": {k: v for k, v in vocab.items() if k != "ids"} if vocab else None,
    }


__all__ = ["DENSE_ABOVE", "STAGE", "ApplyOptions", "predict", "run_apply", "storage_layout"]
