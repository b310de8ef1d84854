"""`make demo`: Orthanc as the PACS and befund as the AI node, on this machine, with three studies.

Starts Orthanc (Debian's package; the Lua auto-forward sends stable CT and slide studies to
befund) and `befund serve`, sends a head CT with a bleed, a normal one and a 3-slice series
the ICH model cannot analyse to Orthanc, waits until befund has delivered its results back
into Orthanc (or reported "not analysed"), and prints where to look. Ctrl-C stops both.

    .venv/bin/python -m service.demo [--workdir var/demo] [--once]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import yaml

from pipelines.model_card import CardError, load_card
from service.config import Destination, load_config
from service.dicom_sender import send_folder
from service.node import load_or_create_token
from service.orthanc_launcher import ORTHANC, Orthanc, free_port
from service.parent_death import killed_with_this_process

PROJECT = Path(__file__).resolve().parent.parent
BEFUND = Path(sys.executable).parent / "befund"
SENDER_AE = "BEFUNDDEMO"  # the "modality" that sends the demo studies to Orthanc
FINAL_STATES = {"delivered", "not analysed", "delivery failed"}
STUDIES = (  # (label, finding, slices, seed, patient name)
    ("bleed", "subdural", 32, 101, "Demo^Bleed"),
    ("normal", "none", 32, 102, "Demo^Normal"),
    ("not analysable", "none", 3, 103, "Demo^Three^Slices"),
)


def port_or_free(preferred: int) -> int:
    """`preferred` if nothing listens there, else a free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers will
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def models_with_weights(models_dir: Path, into: Path) -> Path:
    """A models folder linking only the models that load (card valid, model.onnx present)."""
    into.mkdir(parents=True, exist_ok=True)
    for link in into.iterdir():
        link.unlink()
    for folder in sorted(models_dir.iterdir()):
        if not (folder / "card.yaml").is_file():
            continue
        try:
            load_card(folder)
        except (CardError, OSError) as exc:
            print(f"demo: {folder.name} is left out, its studies will not be analysed: {exc}")
            continue
        (into / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    return into


class BefundProcess:
    """`befund serve` with a YAML config, in its own process group."""

    def __init__(self, workdir: Path, config: dict) -> None:
        self.workdir = workdir
        self.config = config
        self.url = f"http://127.0.0.1:{config['http_port']}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        config_path = self.workdir / "befund.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
        log = (self.workdir / "befund.log").open("ab")
        self.proc = subprocess.Popen(
            [str(BEFUND), "serve", "--config", str(config_path), "--host", "127.0.0.1"],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=killed_with_this_process())  # noqa: PLW1509 - the node ends with the demo
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"befund exited with {self.proc.returncode}; see "
                                   f"{self.workdir / 'befund.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"befund not ready after {timeout:.0f} s; see "
                                   f"{self.workdir / 'befund.log'}")
            time.sleep(0.5)  # poll interval under a deadline

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:  # noqa: S310
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def studies(self) -> dict[str, dict]:
        request = urllib.request.Request(f"{self.url}/studies", headers={  # noqa: S310
            "Authorization": f"Bearer {self.config['token']}", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310
            return {s["study_uid"]: s for s in json.loads(r.read())["studies"]}

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to BentoML's arbiter, which stops its workers; kill whatever is left after
        `grace_s` (the state DB and spool are durable, so a kill loses nothing)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def write_studies(folder: Path) -> list[tuple[str, Path, str]]:
    """The demo phantoms: (label, folder, study uid) each."""
    from phantoms.ct_head import write_ct_series

    out = []
    for label, finding, slices, seed, name in STUDIES:
        series = folder / label.replace(" ", "-")
        paths = write_ct_series(series, finding=finding, slices=slices, seed=seed, patient_name=name)
        out.append((label, series, pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID))
    return out


def wait_for_results(befund: BefundProcess, uids: dict[str, str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        rows = befund.studies()
        for label, uid in uids.items():
            state = rows.get(uid, {}).get("state", "not received yet")
            if seen.get(label) != state:
                print(f"demo: {label:15s} {state}", flush=True)
                seen[label] = state
        if all(rows.get(uid, {}).get("state") in FINAL_STATES for uid in uids.values()):
            return {label: rows[uid] for label, uid in uids.items()}
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every study was finished within {timeout:.0f} s: {seen}")
        time.sleep(1.0)  # poll interval under a deadline


def verdict(row: dict) -> str:
    if row["state"] == "not analysed":
        reason = row["reason"] or "no reason given"
        return reason if "not analysed" in reason else f"not analysed: {reason}"
    if row["present"] is None:
        return row["state"]
    finding = "PRESENT" if row["present"] else "absent"
    return f"{finding} (certainty {100 * (row['certainty'] or 0):.0f}%, {row['model']} " \
           f"{row['model_version']}), {row['state']}"


def results_in_orthanc(pacs: Orthanc, study_uid: str) -> list[str]:
    return [s["MainDicomTags"].get("Modality", "?") for s in pacs.find_series(study_uid)
            if s["MainDicomTags"].get("Modality") in ("SR", "SEG")]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="befund-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=PROJECT / "var" / "demo",
                        help="befund's config, state (reset each run), spool and log (default var/demo)")
    parser.add_argument("--models", type=Path, default=PROJECT / "models",
                        help="model folders (default: the project's models/)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the results")
    parser.add_argument("--once", action="store_true",
                        help="stop after the results are in instead of waiting for Ctrl-C")
    args = parser.parse_args(argv)
    if not Path(ORTHANC).exists():
        print(f"demo: {ORTHANC} not found; install Debian's orthanc (make system-deps)")
        return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "var", ignore_errors=True)  # a fresh node for a fresh Orthanc
    # The ports and token of the working directory's config (befund.yaml, BEFUND_*, var/token),
    # so that `befund status` there asks the demo's node with the right token.
    mine = load_config()
    token = load_or_create_token(mine)
    befund_dicom, befund_http = port_or_free(mine.dicom_port), port_or_free(mine.http_port)
    config = {
        "ae_title": "BEFUND", "dicom_host": "127.0.0.1", "dicom_port": befund_dicom,
        "http_port": befund_http, "var_dir": str(workdir / "var"), "token": token,
        "models_dir": str(models_with_weights(args.models, workdir / "models")),
        "settle_s": 1.0,
    }
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo as Ctrl-C does
    with Orthanc("BEFUND", befund_dicom, lua=True, stable_age=3, explorer=True,
                 senders=(SENDER_AE,), dicom_port=port_or_free(4242),
                 http_port=port_or_free(8042), name="befund-demo-pacs") as pacs:
        config["destinations"] = [f"{pacs.ae}@127.0.0.1:{pacs.dicom_port}"]
        befund = BefundProcess(workdir, config)
        print(f"demo: Orthanc at {pacs.url} (DICOM {pacs.ae}@127.0.0.1:{pacs.dicom_port}); "
              f"starting befund (DICOM BEFUND@127.0.0.1:{befund_dicom}) ...", flush=True)
        try:
            befund.start()
            studies = write_studies(workdir / "phantoms")
            orthanc = Destination(ae_title=pacs.ae, host="127.0.0.1", port=pacs.dicom_port)
            for label, folder, _ in studies:
                sent, failed = send_folder(folder, orthanc, calling_ae=SENDER_AE, progress=False)
                print(f"demo: sent {label} ({sent} instances) to Orthanc"
                      + (f"; {len(failed)} failed: {failed[0][1]}" if failed else ""), flush=True)
            rows = wait_for_results(befund, {label: uid for label, _, uid in studies}, args.timeout)
            pacs.wait_for(lambda: all(results_in_orthanc(pacs, uid) for _, _, uid in studies),
                          60, "the results in Orthanc")
            print("\nResults (AI on synthetic phantoms, not for clinical use):")
            for label, _, uid in studies:
                print(f"  {label:15s} {verdict(rows[label])}; in Orthanc: "
                      f"{', '.join(results_in_orthanc(pacs, uid))}")
            print(f"\n  Orthanc Explorer  {pacs.url}/app/explorer.html")
            print(f"  befund worklist   {befund.url}/   (token: {token})")
            print(f"  befund API        curl -H 'Authorization: Bearer {token}' {befund.url}/studies")
            print(f"  befund log        {workdir / 'befund.log'}")
            status_url = "" if befund_http == mine.http_port else f" --url {befund.url}"
            print(f"  befund status     .venv/bin/befund status{status_url}")
            if not args.once:
                print("\nCtrl-C stops Orthanc and befund.", flush=True)
                while befund.proc.poll() is None:
                    time.sleep(1.0)
                print(f"demo: befund exited; see {workdir / 'befund.log'}")
        except KeyboardInterrupt:
            print("\ndemo: stopping befund and Orthanc ...", flush=True)
        finally:
            befund.stop()
            print("demo: befund and Orthanc stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
