"""The heal stage on a tiny model: the loss falls, merging is exact and size-neutral, resume, data, errors."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sieve_cli import heal as heal_module
from sieve_cli.apply import ApplyOptions, run_apply
from sieve_cli.cli import app
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import InputError, MissingStageError, StaleStageError
from sieve_cli.fit import load_factors
from sieve_cli.heal import HealOptions, batch_indices, load_healed, run_heal
from sieve_cli.models import load_model
from sieve_cli.pruned import SIEVE_JSON, WEIGHTS, count_params, load_pruned
from sieve_cli.tasks import DEFAULT_TASK, bind_task
from sieve_cli.tasks.binding import BoundTask
from sieve_cli.workspace import Stage, Workspace

from .test_apply import write_fit, write_plan

runner = CliRunner()
KEPT = {"q": 0.5, "k": 0.5, "v": 0.4, "o": 1.0, "gate": 0.4, "up": 0.3, "down": 0.5}
FAST = HealOptions(steps=12, lr=1e-2, batch_size=4, seq_len=48, checkpoint_every=4)


def pruned_workspace(root, tiny_dir) -> Workspace:
    """discover, a bound task, SVD factors and a plan (o kept dense): what heal reads."""
    ws = Workspace(root)
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    write_fit(ws, load_model(tiny_dir)[0])
    bind_task(ws, DEFAULT_TASK)
    write_plan(ws, KEPT)
    return ws


@pytest.fixture
def ws(tmp_path, tiny_dir):
    return pruned_workspace(tmp_path / "ws", tiny_dir)


def tokenizer_of(ws):
    return load_model(json.loads(ws.manifest_path(Stage.DISCOVER).read_text())["inputs"]["options"]["model"])[1]


def calibration_rows(ws, seq_len, limit=24) -> list[torch.Tensor]:
    """The first calibration texts as the tokenizer encodes them, cut at seq_len, one tensor each (no padding)."""
    tokenizer = tokenizer_of(ws)
    texts = bind_task(ws, None).texts("calibration")[:limit]
    return [torch.tensor(ids[:seq_len]).unsqueeze(0) for ids in tokenizer(texts)["input_ids"]]


def mean_ce(model, rows) -> float:
    """Reference: transformers' own shifted cross-entropy, one unpadded sequence at a time, in float64."""
    with torch.no_grad():
        losses = [model.double()(input_ids=r, labels=r).loss.item() for r in rows]
    model.float()
    return sum(losses) / len(losses)


def mean_kl(model, dense, rows) -> float:
    """Reference: KL(dense || model) per position, unpadded sequences, float64."""
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = F.log_softmax(dense(r).logits.double()[0], -1)
            q = F.log_softmax(model(r).logits.double()[0], -1)
            total += (p.exp() * (p - q)).sum().item()
            n += r.shape[1]
    return total / n


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_heal_lowers_its_loss_on_calibration_data(ws, tiny_dir, tmp_path, loss):
    options = replace(FAST, loss=loss, steps=30)
    summary = run_heal(ws, options)
    run_apply(ws, ApplyOptions(out=tmp_path / "pruned"))
    run_apply(ws, ApplyOptions(out=tmp_path / "healed", healed=True))
    pruned, healed = load_pruned(tmp_path / "pruned"), load_pruned(tmp_path / "healed")
    rows = calibration_rows(ws, options.seq_len)
    if loss == "ce":
        before, after = mean_ce(pruned, rows), mean_ce(healed, rows)
    else:
        dense = load_model(tiny_dir)[0]
        before, after = mean_kl(pruned, dense, rows), mean_kl(healed, dense, rows)
    assert after < 0.97 * before, (before, after)  # a random tiny model: the drop is small but clear
    assert summary["last_loss"] < summary["first_loss"]
    assert json.loads((tmp_path / "healed" / SIEVE_JSON).read_text())["healed"]["loss"] == loss


def test_merged_model_computes_the_adapter_model_with_the_pruned_size(ws, tmp_path, monkeypatch):
    ids = torch.randint(3, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    seen = {}
    merge = heal_module.merged_factors

    def spy(peft_model, ranks, blocks):
        with torch.no_grad():
            seen["adapter"] = peft_model(input_ids=ids).logits
        seen["trainable"] = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        return merge(peft_model, ranks, blocks)

    monkeypatch.setattr(heal_module, "merged_factors", spy)
    run_heal(ws, FAST)
    plain = run_apply(ws, ApplyOptions(out=tmp_path / "pruned"))
    healed = run_apply(ws, ApplyOptions(out=tmp_path / "healed", healed=True))
    with torch.no_grad():
        merged = load_pruned(tmp_path / "healed")(ids).logits
        unhealed = load_pruned(tmp_path / "pruned")(ids).logits
    torch.testing.assert_close(merged, seen["adapter"], atol=1e-5, rtol=1e-5)
    assert (merged - unhealed).abs().max() > 1e-3  # healing changed the model
    assert count_params(load_pruned(tmp_path / "healed")) == count_params(load_pruned(tmp_path / "pruned"))
    assert healed["params_after"] == plain["params_after"]
    assert (tmp_path / "healed" / WEIGHTS).stat().st_size == (tmp_path / "pruned" / WEIGHTS).stat().st_size
    # only LoRA weights trained, only on the factored maps (o stayed dense, so it has none)
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    assert not any(".o_proj." in n for n in seen["trainable"])


def test_killed_heal_resumes_to_the_same_factors(tmp_path, tiny_dir):
    whole = pruned_workspace(tmp_path / "whole", tiny_dir)
    run_heal(whole, FAST)
    killed = pruned_workspace(tmp_path / "killed", tiny_dir)
    assert run_heal(killed, FAST, stop_after=6) == {"stopped_at": 6, "complete": False}  # checkpoint at step 4
    assert killed.heal_checkpoint.exists() and not killed.read_manifest(Stage.HEAL)["complete"]
    resumed = run_heal(killed, FAST)
    assert not killed.heal_checkpoint.exists()
    a, b = load_healed(whole), load_healed(killed)
    assert a.names() == b.names()
    for name in a.names():
        (rank,) = a.ranks(name)
        for x, y in zip(a.pair(name, rank), b.pair(name, rank), strict=True):
            assert torch.equal(x, y), name
    assert json.loads(killed.heal_losses.read_text()) == json.loads(whole.heal_losses.read_text())
    assert resumed["steps"] == FAST.steps


def test_heal_reads_only_the_calibration_part(ws, monkeypatch):
    parts, read_ids, trained = [], set(), []
    examples = BoundTask.iter_examples

    def spy(self, part):
        parts.append(part)
        for e in examples(self, part):
            read_ids.add(e.id)
            yield e

    call = heal_module.Batches.__call__

    def record(self, step):
        ids, mask = call(self, step)
        trained.extend(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True))
        return ids, mask

    monkeypatch.setattr(BoundTask, "iter_examples", spy)
    monkeypatch.setattr(heal_module.Batches, "__call__", record)
    run_heal(ws, FAST)
    healed_on = set(read_ids)  # what heal read (the checks below read the parts again through the spy)
    assert set(parts) == {"calibration"}
    bound = bind_task(ws, None)
    tokenizer = tokenizer_of(ws)

    def pieces(part):
        out = set()
        for ids in tokenizer(bound.texts(part))["input_ids"]:
            out |= {tuple(ids[i:i + FAST.seq_len]) for i in range(0, len(ids), FAST.seq_len)}
        return out

    assert set(trained) <= pieces("calibration")  # every trained row is a piece of a calibration text
    # the first steps x batch calibration examples: all one run can train on
    assert healed_on == set(bound.ids("calibration")[: FAST.steps * FAST.batch_size])
    assert not healed_on & set(bound.ids("search") + bound.ids("confirm") + bound.ids("test"))


def test_batches_depend_only_on_seed_and_step():
    epoch = [i for step in range(3) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(epoch) == list(range(10))  # one epoch covers every sequence once (last batch short)
    assert batch_indices(10, 4, 5, seed=3) == batch_indices(10, 4, 5, seed=3)
    assert batch_indices(10, 4, 3, seed=3) != batch_indices(10, 4, 3, seed=4)


def test_rerun_is_a_no_op_and_a_new_plan_makes_heal_stale(ws):
    run_heal(ws, FAST)
    assert run_heal(ws, FAST)["up_to_date"]
    write_plan(ws, {**KEPT, "o": 0.5})
    with pytest.raises(StaleStageError, match="sieve heal"):
        load_healed(ws)


def test_heal_without_a_plan_names_sieve_search(tmp_path, tiny_dir):
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    with pytest.raises(MissingStageError, match="sieve search"):
        run_heal(ws, FAST)
    result = runner.invoke(app, ["heal", "-w", str(ws.root), "--steps", "2"])
    assert result.exit_code == 1 and "sieve search" in result.output
    assert len([line for line in result.output.splitlines() if "error" in line]) == 1


def test_apply_healed_without_heal_names_sieve_heal(ws, tmp_path):
    with pytest.raises(MissingStageError, match="sieve heal"):
        run_apply(ws, ApplyOptions(out=tmp_path / "healed", healed=True))
    with pytest.raises(InputError, match="--plan"):
        run_apply(ws, ApplyOptions(out=tmp_path / "healed", healed=True, plan=ws.plan_json))


def test_bad_heal_options_are_one_line():
    with pytest.raises(InputError, match="ce, distill"):
        HealOptions(loss="mse")
    with pytest.raises(InputError, match="--steps"):
        HealOptions(steps=0)
    with pytest.raises(InputError, match="--lr"):
        HealOptions(lr=-1.0)
    result = runner.invoke(app, ["heal", "--loss", "mse"])
    assert result.exit_code == 1 and "--loss must be one of ce, distill" in result.output


def test_cli_heal_then_apply_healed(ws, tmp_path):
    result = runner.invoke(app, ["heal", "-w", str(ws.root), "--steps", "3", "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["steps"] == 3 and summary["loss"] == "ce"
    result = runner.invoke(app, ["apply", "-w", str(ws.root), "-o", str(tmp_path / "healed"), "--healed"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "healed" / SIEVE_JSON).read_text())["healed"]["steps"] == 3
    assert load_factors(ws, "output").names()  # the fit is untouched


def test_run_heal_applies_and_evaluates_the_healed_model_beside_the_pruned_one(tiny_dir, tmp_path, monkeypatch):
    import sieve_cli.search
    from sieve_cli.options import CaptureOptions, RunOptions, SearchOptions, SplitOptions
    from sieve_cli.pipeline import run_pipeline
    from sieve_cli.report.read import collect

    from .test_tasks import write_task

    opts = RunOptions(model=str(tiny_dir), task=str(write_task(tmp_path, "text_modelling")), workspace=tmp_path / "ws",
                      out=tmp_path / "pruned", capture=CaptureOptions(tokens=2000, seq_len=64),
                      split=SplitOptions(max_search=6, max_test=6),
                      search=SearchOptions(grid_step=0.1, tolerance=0.9, confidence=0.5),
                      heal=HealOptions(steps=3, seq_len=32))
    monkeypatch.setattr(sieve_cli.search, "HEAL_SCALES", (0.9,))  # a random model's flat metric accepts any scale
    result = run_pipeline(opts)
    assert [r.stage for r in result.stages] == ["discover", "task", "capture", "fit", "search", "heal", "apply",
                                                "apply healed", "eval dense", "eval pruned", "eval healed",
                                                "eval dense healed"]
    assert result.plan["search"]["healed"]["recipe"]["seq_len"] == 32  # judged by the heal stage's recipe
    assert result.dense_healed["n"] == 6 and result.dense_healed["model"] == "dense healed"
    assert result.healed_out == (tmp_path / "pruned-healed").resolve()
    assert result.healed_apply["params_after"] == result.apply["params_after"]
    assert result.healed["n"] == result.pruned["n"] == 6
    assert [e["id"] for e in result.healed["per_example"]] == [e["id"] for e in result.pruned["per_example"]]
    again = run_pipeline(opts)
    assert not any(r.ran for r in again.stages)
    labels = [s.label for s in collect(Workspace(tmp_path / "ws")).scores]
    assert labels[:4] == ["dense (test split)", "dense healed (test split)", "pruned (test split)",
                          "pruned healed (test split)"]
    values = {s.label: s.value for s in collect(Workspace(tmp_path / "ws")).scores}
    assert values["pruned healed (test split)"] == result.healed["value"]
    assert values["dense healed (test split)"] == result.dense_healed["value"]


def test_a_plan_that_factors_nothing_is_one_line(ws):
    write_plan(ws, dict.fromkeys(KEPT, 1.0))
    with pytest.raises(InputError, match="nothing to heal"):
        run_heal(ws, FAST)
    assert ws.read_manifest(Stage.HEAL) is None  # refused before the stage began
