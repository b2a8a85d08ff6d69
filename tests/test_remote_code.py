"""A pruned folder loads with plain transformers (trust_remote_code), in a Python that cannot import sieve."""

import json
import os
import site
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sieve_cli.errors import InputError
from sieve_cli.modeling import MODELING_FILE
from sieve_cli.pruned import count_params, load_pruned, plan_ranks, prune_in_memory, save_pruned

from .test_pruned import IDENTITY, IDS, logits, random_plan, svd_factors
from .tiny import CONFIGS, tiny_model, tiny_tokenizer

FAMILIES = ["llama", "gpt2", "qwen2"]  # gpt2: Conv1D weights; qwen2: biases on q, k, v

# Run in the child: a Python started with -I -S (no site, no .pth files, so no editable sieve
# finder, no cwd, no PYTHONPATH) given only the site-packages folders, and a meta-path finder
# that refuses sieve_cli however it might be installed.
CHILD = r'''
import importlib.abc, json, sys
sys.path.extend(SITE_PACKAGES)

class NoSieve(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sieve_cli":
            raise ModuleNotFoundError("No module named 'sieve_cli' (blocked)")

sys.meta_path.insert(0, NoSieve())
try:
    import sieve_cli  # noqa: F401
    raise SystemExit("sieve_cli is importable in the clean interpreter")
except ModuleNotFoundError:
    pass

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
ids = load_file(IDS_FILE)["ids"]
report = {}
for folder, copy in FOLDERS:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out = {"logits": model(ids).logits,
               "generated": model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)}
    model.save_pretrained(copy)
    again = AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)
    with torch.no_grad():
        out["reloaded"] = again(ids).logits
    save_file({k: v.contiguous() for k, v in out.items()}, folder + "/child.safetensors")
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        report[folder] = "loaded without trust_remote_code"
    except ValueError as e:
        report[folder] = str(e)
with open(REPORT_FILE, "w") as f:  # not stdout: transformers' trust prompt writes there
    json.dump({"modules": sorted(m for m in sys.modules if m.startswith("sieve")), "plain": report}, f)
'''


def run_without_sieve(folders, ids, tmp_path) -> dict:
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    script = CHILD.replace("SITE_PACKAGES", repr(site.getsitepackages()))
    script = script.replace("IDS_FILE", repr(str(tmp_path / "ids.safetensors"))).replace("FOLDERS", repr(folders))
    script = script.replace("REPORT_FILE", repr(str(tmp_path / "report.json")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text())


def pruned_folder(model_type, folder, quantize=None):
    model = tiny_model(model_type)
    plan = random_plan(model, seed=3)
    prune_in_memory(model, plan_ranks(plan), svd_factors(model))
    save_pruned(model, folder, plan, IDENTITY, tokenizer=tiny_tokenizer(), quantize=quantize)
    return model


def test_a_python_without_sieve_reproduces_sieves_logits_generates_and_saves(tmp_path):
    folders, models = [], {}
    for family in FAMILIES:
        models[family] = pruned_folder(family, tmp_path / family)
        folders.append((str(tmp_path / family), str(tmp_path / f"{family}-copy")))
    report = run_without_sieve(folders, IDS, tmp_path)

    assert report["modules"] == []
    for family, model in models.items():
        child = load_file(str(tmp_path / family / "child.safetensors"))
        expected = logits(model, IDS)
        assert torch.equal(child["logits"], expected), family
        assert torch.equal(child["reloaded"], expected), family
        with torch.no_grad():
            greedy = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(child["generated"], greedy), family
        assert (tmp_path / f"{family}-copy" / MODELING_FILE).is_file()  # save_pretrained carries the file on
        # without trust_remote_code, transformers refuses instead of building the dense model at random
        assert "trust_remote_code=True" in report["plain"][str(tmp_path / family)]


def test_sieve_loads_the_copy_that_transformers_saved(tmp_path):
    model = pruned_folder("llama", tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "copy")
    sieve_json = (tmp_path / "out" / "sieve.json").read_text()
    (tmp_path / "copy" / "sieve.json").write_text(sieve_json)  # save_pretrained does not know sieve.json
    with pytest.raises(InputError, match="not the file sieve apply wrote"):  # its files are not apply's
        load_pruned(tmp_path / "copy")
    assert torch.equal(logits(load_pruned(tmp_path / "copy", verify=False), IDS), logits(model, IDS))


def test_config_json_names_only_the_modeling_file_and_the_placement(tmp_path):
    model = pruned_folder("llama", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "sieve_llama" and config["architectures"] == ["SieveForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_sieve.SieveConfig",
                                  "AutoModelForCausalLM": "modeling_sieve.SieveForCausalLM"}
    factored = {name: m.rank for name, m in model.named_modules() if hasattr(m, "rank")}
    assert {n: s["rank"] for n, s in config["sieve_factored"].items()} == factored
    executable = [p.name for p in (tmp_path / "out").iterdir() if p.suffix in (".py", ".pyc", ".so", ".bin", ".pt")]
    assert executable == [MODELING_FILE]
    source = (tmp_path / "out" / MODELING_FILE).read_text()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imported == {"__future__", "torch", "transformers"}


def test_without_the_modeling_file_sieve_still_loads_and_transformers_names_the_file(tmp_path, caplog):
    model = pruned_folder("llama", tmp_path / "out")
    (tmp_path / "out" / MODELING_FILE).unlink()
    # transformers' own failure (config.json cannot word it: auto_map names only the module) is one line
    # naming the missing file
    with pytest.raises(OSError, match=f"does not appear to have a file named {MODELING_FILE}") as raised:
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert "\n" not in str(raised.value)
    assert torch.equal(logits(load_pruned(tmp_path / "out"), IDS), logits(model, IDS))
    warning = [r.getMessage() for r in caplog.records if MODELING_FILE in r.getMessage()]
    assert len(warning) == 1 and "trust_remote_code" in warning[0] and "sieve_cli.load_pruned" in warning[0]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_family_loads_through_its_modeling_file(model_type, tmp_path):
    model = pruned_folder(model_type, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert isinstance(loaded, type(model))  # the base family's class underneath: generate, save_pretrained
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert count_params(loaded) == count_params(model)


def test_a_format_1_folder_still_loads(tmp_path):
    """Folders written before the modeling file: config.json was the base config, sieve.json format 1."""
    model = pruned_folder("qwen2", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    info = json.loads((tmp_path / "out" / "sieve.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("auto_map", "sieve_factored")}
    (tmp_path / "out" / "config.json").write_text(json.dumps(old | {"model_type": "qwen2",
                                                                    "architectures": ["Qwen2ForCausalLM"]}))
    old_info = {k: v for k, v in info.items() if k != "sha256"}  # recorded since format 2's later folders
    (tmp_path / "out" / "sieve.json").write_text(json.dumps(old_info | {"format": 1}))
    (tmp_path / "out" / MODELING_FILE).unlink()
    assert torch.equal(logits(load_pruned(tmp_path / "out"), IDS), logits(model, IDS))
