import json

import pytest
from typer.testing import CliRunner

from sieve_cli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.mark.parametrize("command", ["discover", "capture", "fit", "search", "apply", "eval"])
def test_help_for_every_command(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_discover_local_folder_writes_workspace(tiny_dir, tmp_path):
    ws = tmp_path / "ws"
    result = invoke("discover", tiny_dir, "-w", ws, "--verbose")
    assert result.exit_code == 0, result.output
    assert "prunable: 14 matrices" in result.output
    assert "model.layers.1.mlp.down_proj" in result.output
    matrices = json.loads((ws / "discover" / "matrices.json").read_text())
    assert matrices["prunable"] == 14
    manifest = json.loads((ws / "discover" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["model"]["kind"] == "local"
    assert len(manifest["inputs"]["model"]["sha256"]) == 64


def test_discover_json(tiny_dir):
    result = invoke("discover", tiny_dir, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["prunable"] == 14 and "matrices" not in data


def test_workspace_bound_to_other_model_is_refused(tiny_dir, tmp_path):
    from .tiny import save_tiny

    other = save_tiny(tmp_path / "other", "llama", seed=1)
    ws = tmp_path / "ws"
    assert invoke("discover", tiny_dir, "-w", ws).exit_code == 0
    result = invoke("discover", other, "-w", ws)
    assert result.exit_code == 1 and "--force" in result.output
    assert invoke("discover", other, "-w", ws, "--force").exit_code == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: (p / "bad.gguf").write_bytes(b"not a gguf") and p / "bad.gguf", "could not load the model"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a .gguf file"),
        (lambda p: p, "has no config.json"),
    ],
)
def test_bad_model_sources_give_one_line(tmp_path, make, message):
    result = invoke("discover", make(tmp_path))
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_unknown_architecture_via_cli(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    from .tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "bloom")
    result = invoke("discover", tmp_path / "bloom")
    assert result.exit_code == 1
    assert "'bloom' is not supported" in result.output and "llama" in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "discover", tmp_path / "missing")
    assert result.exit_code != 0
    assert result.exception is not None and "no such file" in str(result.exception)


@pytest.mark.slow
def test_discover_real_smollm2(smollm2_gguf, tmp_path):
    result = invoke("discover", smollm2_gguf, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["blocks"] == 30 and data["prunable"] == 210
    assert data["total_params"] == 134_515_008
    g = data["groups"]
    assert g["head"]["tied"]
    assert g["attention"]["params"] + g["mlp"]["params"] + g["embedding"]["params"] + g["other"]["params"] == data["total_params"]


def test_up_to_date_workspace_does_not_load_the_model(tiny_dir, tmp_path, monkeypatch):
    import sieve_cli.discover as discover
    from sieve_cli.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    first = discover.run_discover(ws, discover.DiscoverOptions(model=str(tiny_dir)))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the workspace is up to date")

    monkeypatch.setattr(discover, "load_model", no_load)
    again = discover.run_discover(ws, discover.DiscoverOptions(model=str(tiny_dir)))
    assert again["prunable"] == first["prunable"] == 14 and again["model"] == first["model"]
