"""A first run prints sieve's own lines only: known third-party noise is dropped, anything else still shows."""

from __future__ import annotations

import logging

import pytest

from sieve_cli.commands import common
from sieve_cli.commands.run import load_line

PYTREE = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
          "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def seen():
    """What reaches a handler on each logger torch and torchao log through (torch's loggers do not propagate)."""
    collect, loggers = Collect(), [logging.getLogger(n) for n in ("torch.utils._pytree", "torchao", "torchao.kernel.intmm")]
    for logger in loggers:
        logger.addHandler(collect)
    yield collect.messages
    for logger in loggers:
        logger.removeHandler(collect)


@pytest.fixture
def silenced():
    common.silence_known_noise(True)
    yield
    common.silence_known_noise(False)


def test_torchaos_known_lines_are_dropped_and_others_show(silenced, seen):
    import torch

    logging.getLogger("torch.utils._pytree").warning(PYTREE, "<enum 'KernelPreference'>")
    logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
    logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, on systems without ...")
    logging.getLogger("torch.utils._pytree").warning("a real pytree problem")
    logging.getLogger("torchao").warning("a real torchao problem")
    messages = seen
    assert "a real pytree problem" in messages and "a real torchao problem" in messages
    assert not any("Enum subclass" in m for m in messages)
    cpu_only = torch.version.cuda is None  # on a CUDA build a kernel that fails to load is news
    assert any("Failed to load" in m for m in messages) != cpu_only
    assert any("no triton" in m for m in messages) != cpu_only


def test_debug_shows_the_known_lines(seen):
    common.silence_known_noise(True)
    common.silence_known_noise(False)  # what `sieve --debug` leaves
    logging.getLogger("torch.utils._pytree").warning(PYTREE, "<enum 'ScaleCalculationMode'>")
    assert any("Enum subclass" in m for m in seen)


def test_closing_line_names_the_plain_transformers_load(tmp_path):
    """A factored folder loads through its modeling_sieve.py; a standard one (a uniform width plan) needs no code."""
    import json

    factored, standard = tmp_path / "pruned", tmp_path / "narrow"
    for folder, config in ((factored, {"model_type": "sieve_llama", "auto_map": {"AutoConfig": "modeling_sieve.X"}}),
                           (standard, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    line = load_line(factored)
    assert f'AutoModelForCausalLM.from_pretrained("{factored}", trust_remote_code=True)' in line
    assert str(factored / "modeling_sieve.py") in line
    line = load_line(standard)
    assert f'AutoModelForCausalLM.from_pretrained("{standard}")' in line and "trust_remote_code" not in line


def test_transformers_bars_stay_off_and_download_bars_follow_ours():
    """transformers' weight-loading bars never draw between sieve's lines; hub downloads show when ours do."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from sieve_cli import models, progress

    try:
        progress.enable(True)
        models.quiet_transformers_bars()
        assert not hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    finally:
        progress.enable(False)
    models.quiet_transformers_bars()
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()


def test_a_calibration_split_smaller_than_tokens_is_said_not_warned(tmp_path, caplog):
    """Every small task at the default --tokens (the demo's reviews too) reads all of its calibration part:
    an expected outcome, so an info line, not a warning on a first run."""
    from sieve_cli.calibration import calibration_sequences
    from sieve_cli.options import CaptureOptions

    from .test_tasks import bind
    from .tiny import tiny_tokenizer

    bound, _ = bind(tmp_path)
    caplog.set_level(logging.INFO, logger="sieve_cli.calibration")
    calibration, exhausted = calibration_sequences(bound, CaptureOptions(tokens=10**6), tiny_tokenizer())
    assert exhausted and calibration.tokens_run < 10**6
    said = [r for r in caplog.records if "fewer than --tokens" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
