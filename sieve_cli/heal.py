"""Stage heal: LoRA recovery fine-tuning of the plan's factored model, on the calibration part only.

The plan's model is built in memory as search and apply build it (`prune_in_memory`): every
planned matrix a `LowRankLinear` (A then B). A LoRA adapter (peft) is put on each of the two
thin linear maps A and B, and only the adapters train, on the rendered calibration
sequences (the examples capture read; never search, confirm or test). Two losses:
  ce       next-token cross-entropy on the calibration text, gold answers included (default:
           it recovered far more task accuracy than distill in bench/heal.py)
  distill  KL divergence from the dense model's next-token distribution, at every position
Afterwards each adapter is merged into its map (A + dA, B + dB): same shapes, so the healed
model has exactly the pruned model's parameter count and file size. The healed factors are
written as `WS/heal/factors.json` + shards (a fit's format, one trained pair per matrix);
`sieve apply --healed` builds the model from them.

Resumable: every `checkpoint_every` steps the adapters, the optimiser state and the loss
curve go to `WS/heal/checkpoint.pt`. The batch of step k is a function of the seed and k
alone and nothing random happens while training (no dropout), so a killed run resumed
from its checkpoint ends with the same factors as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .accumulate import pad_batch
from .calibration import build_calibration
from .discover import load_workspace_model
from .errors import InputError
from .factors import FactorSet
from .files import atomic_path, read_json, save_safetensors, write_json_atomic
from .fit import load_factors, workspace_matrices
from .lowrank import LowRankLinear, swap_modules
from .matrices import Matrix, weight_of
from .models import pad_id_of
from .narrowing import SkippedAttention
from .options import HealOptions
from .plan import Plan, Ranks
from .pruned import build_replacements, count_params
from .tasks import bind_task
from .workspace import Stage, Workspace

log = logging.getLogger(__name__)

STAGE = Stage.HEAL
HEALED_METHOD = "healed"  # the `method` of the healed factor set (messages name it)
NARROWED_FILE = "narrowed.safetensors"


# ---- pure: batches and losses -------------------------------------------------------------------
def batch_indices(n_sequences: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The calibration sequences of optimiser step `step` (0-based): a function of (seed, step) only.

    Epochs of seeded permutations, cut into batches (the last one of an epoch may be short), so
    a resumed run draws exactly the batches an uninterrupted one would.
    """
    per_epoch = math.ceil(n_sequences / batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * batch_size:(k + 1) * batch_size].tolist()


def ce_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (unpadded) tokens that have a predecessor."""
    predicted, target, keep = logits[:, :-1], ids[:, 1:], mask[:, 1:].bool()
    return F.cross_entropy(predicted[keep].float(), target[keep])


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(teacher || student) between next-token distributions."""
    keep = mask.bool()
    student = F.log_softmax(logits[keep].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[keep].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


# ---- the adapters ------------------------------------------------------------------------------
def lora_targets(model: nn.Module, narrowed: list[str] = ()) -> list[str]:
    """The thin maps A and B of every factored matrix (rank 0 has nothing to adapt), and the `narrowed`
    modules of a width plan (those with at least one input and one output)."""
    pairs = [f"{name}.{part}" for name, module in model.named_modules()
             if isinstance(module, LowRankLinear) and module.rank > 0 for part in ("A", "B")]
    return pairs + [n for n in narrowed if min(weight_of(model.get_submodule(n)).shape) > 0]


def attach_adapters(model: nn.Module, options: HealOptions, narrowed: list[str] = ()) -> nn.Module:
    """The peft model with a LoRA adapter on every factored map; only the adapters train.

    Adapter initialisation draws from torch's global generator: seeded here, in a forked
    state, so the caller's random state is untouched.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("sieve heal needs the peft library: pip install 'sieve-cli[heal]'") from None

    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0, bias="none",
                        target_modules=lora_targets(model, narrowed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return get_peft_model(model, config)


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}


def merged_factors(peft_model: nn.Module, ranks: Ranks, blocks: dict[str, int]) -> tuple[nn.Module, FactorSet]:
    """Merge every adapter into its map; returns the plain model and its factors (one pair per matrix)."""
    model = peft_model.merge_and_unload()
    factors = FactorSet(HEALED_METHOD, blocks={n: blocks[n] for n in ranks if ranks[n] is not None})
    for name, rank in ranks.items():
        if rank is None:
            continue
        module = model.get_submodule(name)
        factors.fixed[name] = {int(rank): (module.B.weight.detach(), module.A.weight.detach())}
    return model, factors


def load_healed(ws: Workspace) -> FactorSet:
    """The healed factors of this workspace (after checking that heal finished on the current plan)."""
    ws.require_fresh(STAGE)
    return FactorSet.load(ws.heal_factors)


def narrowed_names(swapped: dict[str, nn.Module]) -> list[str]:
    """The swapped-in modules of a width plan that LoRA adapts whole (not factor pairs, not skipped attention)."""
    return [n for n, m in swapped.items() if not isinstance(m, (LowRankLinear, SkippedAttention))]


def narrowed_file(ws: Workspace) -> Path:
    """A width plan's healed modules: the state of every narrowed module, LoRA merged in."""
    return ws.inside(ws.stage_dir(STAGE) / NARROWED_FILE)


def load_healed_modules(ws: Workspace, model: nn.Module) -> None:
    """Put the healed weights of a width plan's narrowed modules into `model` (which holds them narrowed)."""
    from safetensors.torch import load_file

    ws.require_fresh(STAGE)
    state = load_file(str(narrowed_file(ws)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise InputError(f"{narrowed_file(ws)} holds modules this plan's model does not have "
                         f"({result.unexpected_keys[:2]}); rerun `sieve heal --force`")


# ---- training ----------------------------------------------------------------------------------
@dataclass
class Batches:
    """The calibration sequences, padded per step on the training device."""

    sequences: list[list[int]]
    pad_id: int
    batch_size: int
    seed: int
    device: torch.device

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [self.sequences[i] for i in batch_indices(len(self.sequences), self.batch_size, step, self.seed)]
        return pad_batch(chosen, self.pad_id, self.device)


def step_loss(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if teacher is None:
        return ce_loss(logits, ids, mask)
    with torch.no_grad():
        target = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return distill_loss(logits, target, mask)


def save_checkpoint(path: Path, step: int, peft_model: nn.Module, optimizer, losses: list[float]) -> None:
    """Adapters, optimiser state and the loss curve after `step` steps; written whole or not at all."""
    with atomic_path(path) as tmp:
        torch.save({"step": step, "adapters": adapter_state(peft_model), "optimizer": optimizer.state_dict(),
                    "losses": losses}, tmp)


def restore_checkpoint(path: Path, peft_model: nn.Module, optimizer) -> tuple[int, list[float]]:
    """The step and losses of a checkpoint, its adapters and optimiser state restored; a damaged one is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["adapters"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["losses"])
    except Exception as exc:  # cut, edited or from other adapters: torch's errors are many and long
        raise InputError(f"{path} is damaged ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
                         f"rerun `sieve heal -w {path.parent.parent} --force` to heal again from the start") from None


def train(peft_model: nn.Module, teacher: nn.Module | None, batches: Batches, options: HealOptions,
          checkpoint: Path | None = None, stop_after: int | None = None) -> list[float]:
    """AdamW on the adapters for `options.steps` steps (from the checkpoint when there is one); the losses.

    `checkpoint` None: nothing is saved (a short heal in memory, e.g. before scoring a candidate).
    `stop_after` ends the run after that many steps of this call, as a kill would: what was done
    since the last checkpoint is lost (tests of resume).
    """
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)
    resuming = checkpoint is not None and checkpoint.exists()
    start, losses = restore_checkpoint(checkpoint, peft_model, optimizer) if resuming else (0, [])
    if start:
        log.info("heal: resuming after step %d of %d", start, options.steps)
    with progress.bar(f"heal ({options.loss})", total=options.steps, completed=start) as bar:
        for step in range(start, options.steps):
            if stop_after is not None and step - start >= stop_after:
                break
            loss = step_loss(peft_model, teacher, *batches(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.advance()
            bar.note(f"loss {losses[-1]:.4f}")
            if checkpoint is not None and (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps:
                save_checkpoint(checkpoint, step + 1, peft_model, optimizer, losses)
    return losses


def heal_in_memory(model: nn.Module, teacher: nn.Module | None, sequences: list[list[int]], pad_id: int,
                   options: HealOptions, narrowed: list[str] = ()) -> tuple[nn.Module, list[float]]:
    """Heal a model that already holds LowRankLinear modules (and the `narrowed` ones), in place; returns it
    (adapters merged) and the losses. No files: what a search scorer calls to heal a candidate."""
    for p in model.parameters():
        p.requires_grad_(False)
    batches = Batches(sequences, pad_id, options.batch_size, options.seed, next(model.parameters()).device)
    with _quiet_peft():
        peft_model = attach_adapters(model, options, narrowed)
    with torch.enable_grad():
        losses = train(peft_model, teacher, batches, options)
    return peft_model.merge_and_unload(), losses


def healed_copy(model: nn.Module, ranks: Ranks, factors: FactorSet | None, options: HealOptions,
                sequences: list[list[int]], pad_id: int, dense_targets: list[str] = (),
                teacher: nn.Module | None = None) -> nn.Module:
    """A copy of the dense `model` with the allocation `ranks` swapped in, healed by `options` exactly as
    `sieve heal` heals that plan (same sequences, batches and seed), in memory; `model` is left as it was.

    Nothing planned (`factors` may then be None): the dense model healed with the same recipe on
    `dense_targets` (the prunable matrices), the reference a healed plan is honestly compared with.
    """
    candidate = copy.deepcopy(model)
    swapped = build_replacements(candidate, ranks, factors) if any(r is not None for r in ranks.values()) else {}
    for module in swapped.values():  # merging writes into these: never into the fit's (shared) factors
        for p in module.parameters():
            p.data = p.data.clone()
    swap_modules(candidate, swapped)
    narrowed = narrowed_names(swapped) if swapped else list(dense_targets)
    if not lora_targets(candidate, narrowed):  # every planned module removed whole: nothing left to adapt
        return candidate.eval()
    healed, _ = heal_in_memory(candidate, teacher, sequences, pad_id, options, narrowed)
    return healed.eval()


def heal_inputs(ws: Workspace, tokenizer, options: HealOptions) -> tuple[list[list[int]], int]:
    """The calibration sequences `options` trains on and the id that pads them: what `run_heal` reads."""
    sequences, _ = calibration_sequences(ws, tokenizer, options.seq_len, options.steps * options.batch_size)
    return sequences, pad_id_of(tokenizer)


def healed_dense_model(ws: Workspace, model: nn.Module, tokenizer, options: HealOptions,
                       inputs: tuple[list[list[int]], int] | None = None) -> nn.Module:
    """The workspace's dense `model` healed by `options` on every prunable matrix (in memory); `inputs`:
    `heal_inputs` when the caller has them already."""
    sequences, pad_id = inputs or heal_inputs(ws, tokenizer, options)
    return healed_copy(model, {}, None, options, sequences, pad_id, [m.name for m in workspace_matrices(ws)])


# ---- the stage ------------------------------------------------------------------------------------
def read_plan(ws: Workspace) -> tuple[Plan, list[Matrix]]:
    ws.require(Stage.SEARCH)  # no plan: names `sieve search`
    plan = Plan.load(ws.plan_json, rebuild=f"{ws.command_for(Stage.SEARCH)} --force")
    found = read_json(ws.matrices_json, rebuild=f"{ws.command_for(Stage.DISCOVER)} --force")
    matrices = [Matrix.from_dict(m) for m in found["matrices"]]
    if plan.method == "width":
        plan.checked_against({u.name: u for u in load_factors(ws, "width").width_units()}, str(ws.plan_json))
        if all(width is None for width in plan.ranks().values()):
            raise InputError(f"the plan in {ws.plan_json} narrows no module: there is nothing to heal; run "
                             f"`sieve search` with a tolerance that prunes")
        return plan, matrices
    plan.checked_against({m.name: m for m in matrices}, str(ws.plan_json))
    if not any(rank for rank in plan.ranks().values()):
        raise InputError(f"the plan in {ws.plan_json} factors no matrix (each is dense or rank 0): there is nothing "
                         f"to heal; run `sieve search` with a tolerance that prunes")
    return plan, matrices


def calibration_sequences(ws: Workspace, tokenizer, seq_len: int, limit: int) -> tuple[list[list[int]], int]:
    """Token ids of the calibration part's first `limit` rendered texts (what capture read first; a
    training split named by `calibration_split` holds far more than a heal run's steps x batch can
    use), cut at `seq_len`; and how many examples they came from. The only part of the task heal reads."""
    texts = bind_task(ws, None).texts("calibration", limit)
    calibration, _ = build_calibration(tokenizer, [("", text) for text in texts], seq_len, sys.maxsize,
                                       share_prefix=False)  # training needs every sequence whole
    sequences = calibration.sequences
    sequences = [s for s in sequences if len(s) > 1]  # a lone token predicts nothing
    if not sequences:
        raise InputError("the task's calibration part holds no text to heal on; rebind the task with a larger "
                         "calibration part (`--calibration-size`)")
    return sequences, len(texts)


@contextmanager
def _quiet_peft():
    """peft warns about modules it does not know the family of; the factored maps are plain Linear."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="peft")
        yield


def run_heal(ws: Workspace, options: HealOptions, force: bool = False, stop_after: int | None = None) -> dict:
    """Heal the plan's factored model with LoRA on the calibration part; writes WS/heal/. Returns the summary.

    Re-running with unchanged inputs does nothing; an unfinished run with the same inputs
    resumes from its last checkpoint. `stop_after` stops after that many steps (tests).
    """
    plan, matrices = read_plan(ws)
    inputs = {"options": options.recorded(),
              "upstream": ws.upstream_hashes(Stage.DISCOVER, Stage.TASK, Stage.SEARCH, Stage.fit(plan.method))}
    resume = not force and ws.resumable(STAGE, inputs)  # --force heals again from step 0
    if not ws.begin(STAGE, inputs, force):
        log.info("heal is up to date in %s; nothing to do (--force heals again)", ws.root)
        return {**(ws.read_manifest(STAGE) or {}).get("summary", {}), "up_to_date": True}
    if not resume:
        for stale in (ws.heal_checkpoint, ws.heal_losses):
            stale.unlink(missing_ok=True)
    started = time.perf_counter()
    model, tokenizer = load_workspace_model(ws, options.dtype, options.device)
    teacher = load_workspace_model(ws, options.dtype, options.device)[0] if options.loss == "distill" else None
    ranks = plan.ranks()
    swapped = build_replacements(model, ranks, load_factors(ws, plan.method))
    swap_modules(model, swapped)
    narrowed = narrowed_names(swapped)
    params = count_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    sequences, examples = calibration_sequences(ws, tokenizer, options.seq_len, options.steps * options.batch_size)
    pad_id = pad_id_of(tokenizer)
    batches = Batches(sequences, pad_id, options.batch_size, options.seed, next(model.parameters()).device)
    with _quiet_peft():
        peft_model = attach_adapters(model, options, narrowed)
    adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    losses = train(peft_model, teacher, batches, options, ws.heal_checkpoint, stop_after)
    if len(losses) < options.steps:  # stopped as a kill would stop it (tests): the last checkpoint is kept
        return {"stopped_at": len(losses), "complete": False}
    if plan.method == "width":  # the narrowed modules' merged weights
        model = peft_model.merge_and_unload()
        state = {f"{n}.{k}": v.detach().contiguous() for n in narrowed
                 for k, v in model.get_submodule(n).state_dict().items()}
        save_safetensors(state, narrowed_file(ws))
        files = [narrowed_file(ws)]
    else:
        model, healed = merged_factors(peft_model, ranks, {m.name: m.block for m in matrices})
        files = healed.save(ws.heal_factors, dtype=next(model.parameters()).dtype)
    if count_params(model) != params:
        raise AssertionError("merging the adapters changed the parameter count")  # shapes never change
    write_json_atomic(ws.heal_losses, losses)
    ws.heal_checkpoint.unlink(missing_ok=True)
    summary = summarise(options, losses, sequences, examples, adapters, params, time.perf_counter() - started)
    ws.finish(STAGE, inputs, [*files, ws.heal_losses], summary=summary)
    return summary


def summarise(options: HealOptions, losses: list[float], sequences, examples: int, adapters: int, params: int,
              seconds: float) -> dict:
    window = max(1, min(10, len(losses) // 4))  # first and last losses, smoothed over a few steps
    return {"loss": options.loss, "steps": options.steps, "lr": options.lr, "lora_rank": options.rank,
            "first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window,
            "calibration_examples": examples, "sequences": len(sequences), "tokens": sum(map(len, sequences)),
            "adapter_params": adapters, "params": params, "seconds": round(seconds, 1)}


__all__ = ["STAGE", "HealOptions", "batch_indices", "ce_loss", "distill_loss", "load_healed", "run_heal"]
