"""README "Calling a model directly": its snippets run as written against a model service
started as the README says (on a free port instead of 3001), and they name everything they use."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import pytest

from tests.dicom_peers import free_port
from tests.node_harness import PROJECT, poll, stop_bentoml

README = PROJECT / "README.md"


def section_blocks() -> tuple[str, list[str]]:
    text = README.read_text()
    start = text.index("### Calling a model directly")
    end = text.index("\n## ", start)  # the next top-level section, whichever it is
    section = text[start:end]
    return (re.search(r"```sh\n(.*?)```", section, re.S).group(1),
            re.findall(r"```python\n(.*?)```", section, re.S))


def test_the_snippets_define_every_name_they_use():
    _, blocks = section_blocks()
    assert len(blocks) == 2
    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F821,F401",
                              "--stdin-filename", "snippet.py", "-"], input="\n".join(blocks),
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


@pytest.fixture(scope="module")
def model_service(tmp_path_factory):
    shell, _ = section_blocks()
    port = free_port()
    command = shell.split("#")[0].strip().replace("3001", str(port)).split()
    assert command[:3] == [".venv/bin/bentoml", "serve", "service.model_service:ModelService"]
    home = tmp_path_factory.mktemp("bentoml-home")
    log = (home / "model-service.log").open("wb")
    proc = subprocess.Popen([str(PROJECT / command[0]), *command[1:]], cwd=PROJECT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**_env(), "BENTOML_HOME": str(home)})

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((home / "model-service.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        poll(ready, 120, 0.25, "the model service")
        yield port
    finally:
        stop_bentoml(proc)
        log.close()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}


def test_the_snippets_run_against_the_model_service_the_readme_starts(model_service):
    _, blocks = section_blocks()
    program = "\n".join(blocks).replace("127.0.0.1:3001", f"127.0.0.1:{model_service}")
    program += "\nprint('logits', logits.shape)\n"
    ran = subprocess.run([sys.executable, "-c", program], cwd=PROJECT, capture_output=True, text=True,
                         timeout=120, env=_env())
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "logits (64, 1)" in ran.stdout
