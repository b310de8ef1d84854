"""`bentoml build` turns bentofile.yaml into a Bento that holds the code and the models."""

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_bento_holds_code_and_models(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.run([str(bentoml), "build", "--output", "tag"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bentos = list((tmp_path / "bentoml" / "bentos" / "befund").glob("*/src"))
    assert len(bentos) == 1, proc.stdout
    src = bentos[0]
    for card in (PROJECT / "models").glob("*/card.yaml"):
        name = card.parent.name
        assert (src / "models" / name / "card.yaml").is_file()
        assert (src / "models" / name / "model.onnx").is_file()
        assert not (src / "models" / name / "train.py").exists()
    for module in ("service/gateway.py", "service/model_service.py", "pipelines/ct_triage.py"):
        assert (src / module).is_file(), module
    assert not (src / "tests").exists()
