"""The `befund` command line: phantoms, send (to a real storescp), and config errors."""

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.dicom_peers import StoreSCP, have_dcmtk

BEFUND = str(Path(sys.executable).parent / "befund")


def run(*args, cwd=None):
    return subprocess.run([BEFUND, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_phantom_ct_writes_a_series(tmp_path):
    proc = run("phantom", "ct", "--out", str(tmp_path / "ct"), "--finding", "subdural",
               "--slices", "5", "--seed", "3", "--transfer-syntax", "rle")
    assert proc.returncode == 0, proc.stderr
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == 5
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"


def test_phantom_wsi_writes_a_pyramid(tmp_path):
    proc = run("phantom", "wsi", "--out", str(tmp_path / "wsi"), "--width", "2048",
               "--height", "1536", "--tumor", "0.2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    levels = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "wsi").glob("*.dcm")]
    assert levels and all(ds.Modality == "SM" for ds in levels)
    assert max(ds.TotalPixelMatrixColumns for ds in levels) == 2048


@pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")
def test_send_delivers_every_instance_to_a_real_scp(tmp_path):
    run("phantom", "ct", "--out", str(tmp_path / "ct"), "--slices", "4", "--seed", "5",
        "--transfer-syntax", "j2k-lossless")
    with StoreSCP(tmp_path / "scp", ae="PACS", extra_args=("+xa", "-pm", "+B")) as scp:
        proc = run("send", str(tmp_path / "ct"), "--to", f"PACS@127.0.0.1:{scp.port}", "--quiet")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "sent 4 instance(s), 0 failed" in proc.stdout
        assert len(list((tmp_path / "scp").iterdir())) == 4


def test_unknown_config_key_fails_with_its_name(tmp_path):
    (tmp_path / "befund.yaml").write_text("dicom_prot: 104\n")
    proc = run("serve", "--config", str(tmp_path / "befund.yaml"))
    assert proc.returncode == 2
    assert "dicom_prot" in proc.stderr
