"""The Python API of the LLM-Sieve seed: `LLMSieveConfig`, `TransformerPruner`, `diagnose_model`.

For notebooks: the model is already in memory, the calibration data is any iterable of
token-id batches (or texts) and the metric any `eval_fn(model) -> float`. It runs the
same stage functions as the CLI (capture_statistics, fit_model, `find_plan` with any
strategy of `sieve search`, prune_in_memory, save_pruned) inside a workspace folder, so every artifact
(statistics, factors, history) can be inspected afterwards.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .accumulate import model_device
from .capture import capture_statistics
from .discover import diagnose
from .errors import InputError
from .factors import FactorSet
from .files import sha256_json
from .fit import fit_model, record_fit
from .matrices import Matrix, find_matrices
from .options import STRATEGIES, CaptureOptions, FitOptions, GAConfig, SearchOptions, check_quantize
from .plan import Plan
from .pruned import prune_in_memory, save_pruned
from .search import find_plan, swapping_scorer
from .workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMSieveConfig:
    """The seed's configuration, with its defaults; `fit_method` defaults to the exact optimum."""

    calibration_tokens: int = 200_000
    batch_size: int = 5000  # the seed's; unused: the `learned` fit trains full batch on the captured Gram
    learning_rate: float = 0.001  # Adam's rate for the `learned` fit (the paper's; `sieve fit` starts at 1e-2)
    num_epochs: int = 2  # the seed's; unused: `learned` trains until its loss stops falling
    pruning_strategy: str = "uniform"  # or adaptive (the measured best), seeds, local, genetic
    target_accuracy_drop: float = 0.05  # relative to the baseline accuracy
    prune_attention: bool = True
    prune_mlp: bool = True
    ga_population_size: int = GAConfig.population
    ga_generations: int = GAConfig.generations
    fit_method: str = "output"  # output (exact), learned (the paper's), svd, pca
    workspace: str | None = None  # where artifacts go; None: a new temporary folder
    seq_len: int = 512

    def __post_init__(self) -> None:
        if self.pruning_strategy not in STRATEGIES:
            raise InputError(f"pruning_strategy must be one of {', '.join(STRATEGIES)}, got {self.pruning_strategy!r}")
        if not (self.prune_attention or self.prune_mlp):
            raise InputError("prune_attention and prune_mlp are both False: nothing to prune")
        if not 0 <= self.target_accuracy_drop < 1:
            raise InputError(f"target_accuracy_drop must be in [0, 1), got {self.target_accuracy_drop}")

    def search_options(self, strategy: str) -> SearchOptions:
        return SearchOptions(strategy=strategy, method=self.fit_method, tolerance=self.target_accuracy_drop,
                             ga=GAConfig(population=self.ga_population_size, generations=self.ga_generations))

    def fit_options(self) -> FitOptions:
        return FitOptions(method=self.fit_method, lr=self.learning_rate)


def diagnose_model(model: nn.Module, name: str | None = None) -> dict:
    """What `sieve discover` reports, as a dict: `prunable` (count), `groups` (the per-type table), ..."""
    result = diagnose(model)
    result["name"] = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return result


class TransformerPruner:
    """Prune an in-memory model: calibrate, fit, search with your metric, apply, save.

    >>> pruner = TransformerPruner(model, LLMSieveConfig(calibration_tokens=50_000), tokenizer)
    >>> factors = pruner.uniform_prune(calibration_batches, eval_fn)   # {matrix name: kept fraction}
    >>> pruner.apply_pruning(); pruner.save_pruned_model("pruned/")

    The workspace folder is locked only while a call runs, so another process may read or use
    it between calls; `close()` (or a `with` block) releases it explicitly.
    """

    def __init__(self, model: nn.Module, config: LLMSieveConfig | None = None, tokenizer=None) -> None:
        self.model, self.config, self.tokenizer = model, config or LLMSieveConfig(), tokenizer
        root = self.config.workspace or tempfile.mkdtemp(prefix="sieve-api-")
        self.workspace = Workspace(root)
        self.targets = self._targets()
        self.factors: FactorSet | None = None
        self.plan: Plan | None = None
        self._restore: Callable[[], None] | None = None

    def _targets(self) -> list[Matrix]:
        groups = {g for g, on in (("attention", self.config.prune_attention), ("mlp", self.config.prune_mlp)) if on}
        return [m for m in find_matrices(self.model) if m.group in groups]

    # ---- calibration + fit --------------------------------------------------------------
    # ---- the workspace lock: held during a call, never while the object sits idle ---------------
    def close(self) -> None:
        """Release the workspace (also done after every call; the object stays usable)."""
        self.workspace.unlock()

    def __enter__(self) -> "TransformerPruner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def calibrate(self, calibration_loader: Iterable) -> FactorSet:
        """Capture statistics from the loader's batches and fit every matrix (done once)."""
        if self.factors is not None:
            return self.factors
        with self.workspace.held():
            return self._calibrate(calibration_loader)

    def _calibrate(self, calibration_loader: Iterable) -> FactorSet:
        sequences = self._sequences(calibration_loader)
        options = CaptureOptions(tokens=sum(map(len, sequences)), seq_len=self.config.seq_len)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        capture_statistics(self.model, sequences, options, self.workspace.capture_store, pad_id=pad, fresh=True)
        # the decompositions run where the user's model lives (capture and search use it in place)
        fit_options = replace(self.config.fit_options(), device=str(model_device(self.model)))
        self.factors, spectrum = fit_model(self.model, self.workspace.capture_store, fit_options)
        self._record_fit(fit_options, spectrum)
        return self.factors

    def _sequences(self, loader: Iterable) -> list[list[int]]:
        """Token-id sequences from batches of ids (tensors, lists, dicts with input_ids) or texts, to the budget."""
        budget, sequences = self.config.calibration_tokens, []
        for batch in loader:
            for seq in self._rows(batch):
                seq = seq[: min(self.config.seq_len, budget)]
                if seq:
                    sequences.append(seq)
                    budget -= len(seq)
                if budget <= 0:
                    return sequences
        if not sequences:
            raise InputError("the calibration loader gave no tokens")
        return sequences

    def _rows(self, batch) -> list[list[int]]:
        if isinstance(batch, str) or (isinstance(batch, list) and batch and isinstance(batch[0], str)):
            if self.tokenizer is None:
                raise InputError("the calibration loader gives texts: pass tokenizer= to TransformerPruner")
            texts = [batch] if isinstance(batch, str) else batch
            return self.tokenizer(texts)["input_ids"]
        mask = None
        if isinstance(batch, dict):
            batch, mask = batch["input_ids"], batch.get("attention_mask")
        ids = torch.as_tensor(batch)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if mask is None:
            return [row.tolist() for row in ids]
        mask = torch.as_tensor(mask).reshape(ids.shape).bool()
        return [row[m].tolist() for row, m in zip(ids, mask)]  # padding dropped

    def _record_fit(self, options: FitOptions, spectrum: dict) -> None:
        """Write the fit as the `fit/<method>` stage, so the GA's greedy seeds can read its spectrum."""
        inputs = {"options": options.recorded(), "upstream": {"api": sha256_json([t.name for t in self.targets])}}
        record_fit(self.workspace, options.method, self.factors, spectrum, inputs)

    # ---- search -------------------------------------------------------------------------
    def uniform_prune(self, calibration_loader: Iterable, eval_fn: Callable[[nn.Module], float],
                      baseline_accuracy: float | None = None) -> dict[str, float]:
        """Binary search for one kept fraction p for every matrix; returns {matrix name: kept fraction}."""
        return self._search("uniform", calibration_loader, eval_fn, baseline_accuracy)

    def adaptive_prune(self, calibration_loader: Iterable, eval_fn: Callable[[nn.Module], float],
                       baseline_accuracy: float | None = None) -> dict[str, float]:
        """The adaptive search (`options.ADAPTIVE`: the local search from greedy seeds) for a kept fraction per
        matrix; returns {matrix name: kept fraction}."""
        return self._search("adaptive", calibration_loader, eval_fn, baseline_accuracy)

    def _search(self, strategy: str, loader: Iterable, eval_fn: Callable[[nn.Module], float],
                baseline: float | None) -> dict[str, float]:
        if self._restore is not None:
            raise InputError("pruning is already applied to this model; create a new TransformerPruner")
        with self.workspace.held():
            return self._search_held(strategy, loader, eval_fn, baseline)

    def _search_held(self, strategy: str, loader: Iterable, eval_fn: Callable[[nn.Module], float],
                     baseline: float | None) -> dict[str, float]:
        factors = self.calibrate(loader)
        ws = self.workspace
        ws.history_jsonl.parent.mkdir(parents=True, exist_ok=True)
        ws.history_jsonl.unlink(missing_ok=True)
        scorer = swapping_scorer(self.model, factors, eval_fn, metric="eval_fn")
        checkpoint = {} if baseline is None else {"dense": float(baseline), "metric": "eval_fn", "examples": None}
        total = sum(p.numel() for p in self.model.parameters())
        self.plan = find_plan(ws, self.config.search_options(strategy), scorer, self.targets, factors, total,
                              checkpoint=checkpoint)
        ws.search_checkpoint.unlink(missing_ok=True)
        self.plan.save(ws.plan_json)
        return self.plan.kept()

    # ---- apply + save -------------------------------------------------------------------
    def apply_pruning(self) -> nn.Module:
        """Swap the chosen low-rank modules into the model (in place); returns the model."""
        if self.plan is None or self.factors is None:
            raise InputError("no plan yet: call uniform_prune(...) or adaptive_prune(...) first")
        if self._restore is None:
            self._restore = prune_in_memory(self.model, self.plan, self.factors)
        return self.model

    def save_pruned_model(self, path: str | Path, quantize: str | None = None) -> dict:
        """Save the pruned model (reload with `sieve_cli.load_pruned(path)`); returns its sieve.json.

        `quantize` ("int8") stores the linear weights quantised, as `sieve apply --quantize` does.
        """
        check_quantize(quantize)
        self.apply_pruning()
        identity = {"kind": "memory", "name": getattr(self.model.config, "_name_or_path", "")}
        return save_pruned(self.model, path, self.plan.data, identity, self.tokenizer, self.config.fit_method,
                           quantize=quantize)


__all__ = ["LLMSieveConfig", "TransformerPruner", "diagnose_model"]
