"""The Dockerfile parses, installs dependencies before the code, and keeps caches and outputs on volumes.

`docker` is not available where the tests run, so the image is not built here: this reads the file.
"""

import json
import shlex
from pathlib import Path

from .conftest import REPO


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            joined.append(current.strip())
            current = ""
    assert not current, "a continued line never ends"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def test_dockerfile_layers_dependencies_before_code_and_uses_volumes():
    steps = instructions(REPO / "Dockerfile")
    names = [name for name, _ in steps]
    assert names[0] == "FROM"
    known = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "VOLUME", "ENTRYPOINT", "CMD", "ARG", "LABEL", "EXPOSE", "USER"}
    assert set(names) <= known, set(names) - known
    copies = [(i, shlex.split(args)) for i, (name, args) in enumerate(steps) if name == "COPY"]
    for _, args in copies:  # every COPY source exists in the repository
        for source in args[:-1]:
            assert (REPO / source).exists(), source
    code_copy = next(i for i, args in copies if "sieve_cli" in args[:-1])
    deps_install = next(i for i, (name, args) in enumerate(steps) if name == "RUN" and "requirements" in args)
    assert deps_install < code_copy, "dependencies must be installed before the code is copied"
    volumes = json.loads(next(args for name, args in steps if name == "VOLUME"))
    env = dict(item.split("=", 1) for name, args in steps if name == "ENV" for item in shlex.split(args))
    assert any(env["SIEVE_CACHE"].startswith(v) for v in volumes)
    assert any(env["SIEVE_WORKSPACE"].startswith(v) for v in volumes)
    assert json.loads(next(args for name, args in steps if name == "ENTRYPOINT")) == ["sieve"]
