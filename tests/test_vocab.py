"""--vocab task: the kept ids of a bound task, the TaskHead, and apply's folder with it (tiny llama, untied and tied)."""

import json
from unittest import mock

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sieve_cli.apply import ApplyOptions, run_apply
from sieve_cli.cli import app
from sieve_cli.discover import DiscoverOptions, run_discover
from sieve_cli.errors import InputError
from sieve_cli.models import load_model
from sieve_cli.options import SplitOptions
from sieve_cli.prepared import split_tokens
from sieve_cli.pruned import SIEVE_JSON, VOCAB_FILE, WEIGHTS, count_params, load_pruned
from sieve_cli.taskhead import TaskHead, task_head_of
from sieve_cli.tasks import bind_task
from sieve_cli.vocab import task_vocabulary
from sieve_cli.workspace import Workspace

from .test_apply import KEPT, write_fit, write_plan
from .tiny import CONFIGS, VOCAB, save_tiny, tiny_tokenizer

runner = CliRunner()
# one character per record that no other record has: a held-out record's own id
OWN = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&*+/<=>?@^_|~"
RECORDS = 48
SPLIT = SplitOptions(search=8, confirm=8, test=8)  # calibration: the other 24


def write_task(folder):
    with open(folder / "data.jsonl", "w") as f:
        for i in range(RECORDS):
            f.write(json.dumps({"uid": f"r{i}", "sentence": f"the cat sat {OWN[i]}", "label": i % 2}) + "\n")
    task = {"task": "vocab_mc", "dataset_path": "json", "data_files": "data.jsonl", "id_field": "uid",
            "output_type": "multiple_choice", "doc_to_text": "Q: {{ sentence }}\nA:", "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"], "num_fewshot": 2}
    path = folder / "vocab_mc.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def ids_of(tokenizer, texts) -> set[int]:
    return {i for t in texts for i in tokenizer(t)["input_ids"]}


def test_kept_ids_cover_calibration_fewshot_choices_and_special_ids_never_held_out_ones(tmp_path):
    tokenizer = tiny_tokenizer()
    bound = bind_task(Workspace(tmp_path / "ws"), write_task(tmp_path), split=SPLIT)
    chosen = task_vocabulary(bound, tokenizer, VOCAB, extra=0)
    kept = set(chosen.ids)
    own = ids_of(tokenizer, bound.texts("calibration")) | ids_of(tokenizer, [e.text(" ") for e in bound.fewshot_examples()])
    choices = {i for e in bound.examples("calibration") for c in e.choices for part in split_tokens(tokenizer, e.context, " " + c)
               for i in part}
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert own | choices | special == kept
    held_out = ids_of(tokenizer, [t for part in ("search", "confirm", "test") for t in bound.texts(part)])
    exclusive = held_out - own - choices
    assert len(exclusive) >= 20 and not exclusive & kept  # every held-out record brings its own character
    assert len(bound.fewshot_examples()) == 3  # num_fewshot + the spare

    more = task_vocabulary(bound, tokenizer, VOCAB, extra=5)
    added = sorted(set(more.ids) - kept)
    assert added == sorted(i for i in range(VOCAB) if i not in kept)[:5]  # the lowest others
    assert (more.from_task, more.from_special, more.from_extra) == (len(own | choices), len(special - own - choices), 5)


def test_task_head_scores_kept_ids_exactly_and_the_rest_very_negative():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 20, bias=True)
    model = mock.Mock(get_output_embeddings=lambda: linear, get_input_embeddings=lambda: None)
    head = task_head_of(model, [7, 3, 11, 3])
    hidden = torch.randn(2, 5, 8)
    logits, full = head(hidden), linear(hidden)
    index = torch.tensor([3, 7, 11])
    assert torch.equal(head.index, index) and head.weight.shape == (3, 8)
    torch.testing.assert_close(logits[..., index], full[..., index])
    outside = torch.ones(20, dtype=torch.bool)
    outside[index] = False
    assert (logits[..., outside] == torch.finfo(logits.dtype).min).all()
    torch.testing.assert_close(logits.log_softmax(-1)[..., index], full[..., index].log_softmax(-1))  # normalised over kept
    assert torch.isfinite(logits.log_softmax(-1)).all()
    assert isinstance(head, TaskHead)


def tied_folder(folder):
    with mock.patch.dict(CONFIGS, {"llama": dict(CONFIGS["llama"], tie_word_embeddings=True)}):
        return save_tiny(folder, "llama")


@pytest.fixture(params=["untied", "tied"])
def applied(request, tmp_path, tiny_dir):
    """Both folders of one plan (vocab full and task) from a workspace with a bound task."""
    model_dir = tiny_dir if request.param == "untied" else tied_folder(tmp_path / "tied-llama")
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(model_dir)))
    write_fit(ws, load_model(model_dir)[0])
    write_plan(ws, KEPT)
    bind_task(ws, write_task(tmp_path), split=SPLIT)
    full = run_apply(ws, ApplyOptions(out=tmp_path / "full"))
    task = run_apply(ws, ApplyOptions(out=tmp_path / "task", vocab="task", vocab_extra=3), force=True)
    return request.param, ws, full, task, tmp_path


def test_the_task_folder_reloads_with_full_logits_on_kept_ids_and_fewer_parameters(applied):
    kind, ws, full, task, root = applied
    info = json.loads((root / "task" / SIEVE_JSON).read_text())
    ids = json.loads((root / "task" / VOCAB_FILE).read_text())["ids"]
    assert VOCAB_FILE in info["files"] and info["sha256"][VOCAB_FILE]
    assert info["vocab"]["kept"] == len(ids) == task["vocab"]["kept"] and info["vocab"]["tied"] == (kind == "tied")
    assert info["factored"]["lm_head"]["type"] == "task_head"
    k, hidden = len(ids), 32
    assert 3 < k < VOCAB - 20
    dense, pruned = load_pruned(root / "full"), load_pruned(root / "task")
    if kind == "untied":
        assert task["params_after"] == full["params_after"] - (VOCAB - k) * hidden == count_params(pruned)
        assert info["params"] == task["params_after"] and pruned.lm_head.weight.shape == (k, hidden)
    else:
        assert task["params_after"] == full["params_after"] == count_params(pruned)
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
        assert task["vocab"]["head_params_removed"] == 0
    outside = torch.tensor([i for i in range(VOCAB) if i not in set(ids)])
    inputs = torch.tensor([[5, 6, 7, *outside[:6].tolist(), 9]])  # ids outside the set are inputs like any other
    with torch.no_grad():
        expected, logits = dense(inputs).logits, pruned(inputs).logits
    torch.testing.assert_close(logits[..., ids], expected[..., ids])
    assert (logits[..., outside] == torch.finfo(logits.dtype).min).all()

    # prompts after which the full head's argmax is an outside id: the task head must pick a kept one
    prompts = torch.tensor([[5, a, b] for a in range(3, VOCAB, 7) for b in range(4, VOCAB, 11)])
    with torch.no_grad():
        escapes = prompts[~torch.isin(dense(prompts).logits[:, -1].argmax(-1), torch.tensor(ids))]
    assert len(escapes) >= 4
    generated = pruned.generate(escapes[:8], max_new_tokens=16, min_new_tokens=16, do_sample=False)[:, 3:]
    assert torch.isin(generated, torch.tensor(ids)).all()


def test_transformers_alone_loads_the_task_folder(applied):
    from transformers import AutoModelForCausalLM

    kind, _, _, _, root = applied
    ours = load_pruned(root / "task")
    theirs = AutoModelForCausalLM.from_pretrained(root / "task", trust_remote_code=True).eval()
    inputs = torch.tensor([[5, 6, 7, 120, 9]])
    with torch.no_grad():
        assert torch.equal(ours(inputs).logits, theirs(inputs).logits)
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == (kind == "tied")


def test_a_changed_vocab_file_is_refused(applied):
    _, _, _, _, root = applied
    path = root / "task" / VOCAB_FILE
    ids = json.loads(path.read_text())["ids"]
    path.write_text(json.dumps({"ids": ids[:-1]}) + "\n")
    with pytest.raises(InputError, match=VOCAB_FILE):
        load_pruned(root / "task")
    assert (root / "task" / WEIGHTS).is_file()


def test_dry_run_predicts_the_task_vocabulary(tmp_path, tiny_dir):
    ws = Workspace(tmp_path / "ws")
    run_discover(ws, DiscoverOptions(model=str(tiny_dir)))
    write_fit(ws, load_model(tiny_dir)[0])
    write_plan(ws, KEPT)
    bind_task(ws, write_task(tmp_path), split=SPLIT)
    predicted = run_apply(ws, ApplyOptions(out=tmp_path / "task", vocab="task", vocab_extra=3, dry_run=True))
    real = run_apply(ws, ApplyOptions(out=tmp_path / "task", vocab="task", vocab_extra=3))
    assert predicted["params_after"] == real["params_after"] and predicted["vocab"]["kept"] == real["vocab"]["kept"]


def test_bad_vocab_options_are_one_line_errors(tmp_path):
    for args, words in ((["--vocab", "foo"], "--vocab 'foo'"), (["--vocab-extra", "-1"], "--vocab-extra")):
        result = runner.invoke(app, ["apply", "-w", str(tmp_path / "ws"), "-o", str(tmp_path / "out"), *args])
        assert result.exit_code != 0
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], result.output


def test_eval_scores_the_task_folder_alike_loaded_whole_and_streamed(applied):
    from sieve_cli.evaluate import run_eval
    from sieve_cli.options import EvalOptions

    _, ws, _, _, root = applied
    whole = run_eval(ws, EvalOptions(model=str(root / "task"), mode="memory", batch_size=3))
    streamed = run_eval(ws, EvalOptions(model=str(root / "task"), mode="blockwise", batch_size=3), force=True)
    assert streamed["layout"]["mode"] == "blockwise" and whole["layout"]["mode"] == "memory"
    scores = [e["score"] for e in whole["per_example"]]
    assert len(scores) == 8
    torch.testing.assert_close([e["score"] for e in streamed["per_example"]], scores)


def test_a_width_plan_with_a_task_vocabulary_falls_back_to_the_custom_folder_and_says_so(tmp_path):
    from sieve_cli.modeling import MODELING_FILE
    from sieve_cli.pruned import prune_in_memory

    from .test_width_apply import width_workspace, write_width_plan

    ws, model, units, factors = width_workspace(tmp_path, "llama")
    bind_task(ws, write_task(tmp_path), split=SPLIT)
    half = {u.name: u.units // 2 for u in units}  # one width everywhere: a standard folder without --vocab task
    out = tmp_path / "out"
    result = runner.invoke(app, ["apply", "-w", str(ws.root), "-o", str(out), "--plan", str(write_width_plan(ws, units, half)),
                                 "--vocab", "task", "--vocab-extra", "0"])
    assert result.exit_code == 0, result.output
    assert "a standard folder cannot hold this head" in " ".join(result.output.split())
    info = json.loads((out / SIEVE_JSON).read_text())
    assert "standard" not in info and info["vocab"]["standard_fallback"] and (out / MODELING_FILE).is_file()
    ids = json.loads((out / VOCAB_FILE).read_text())["ids"]
    prune_in_memory(model, half, factors)
    inputs = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected, got = model(inputs).logits, load_pruned(out)(inputs).logits
    torch.testing.assert_close(got[..., ids], expected[..., ids], atol=1e-5, rtol=1e-5)


def test_a_softcapped_head_is_refused_in_one_line(tmp_path):
    from transformers import AutoConfig

    from sieve_cli.apply import refuse_softcapping

    with pytest.raises(InputError, match="final_logit_softcapping"):
        refuse_softcapping(AutoConfig.for_model("gemma2"))
    refuse_softcapping(AutoConfig.for_model("gemma3_text"))  # Gemma 3 has no cap: allowed
