"""The README's "Try it" block, run as written in a fresh copy of the checkout.

The copy gets a venv as `make install` would leave it, made offline: the test's own packages
(a .pth to this venv's site-packages) and befund installed from the copy, not from here, so
the node that starts runs the copy's code. The block then runs unchanged but for its ports
(free ones in place of 11112, 11113 and 3000, which another node on this machine may hold).
Also here: the things the block relies on when it goes wrong (a port in use says which
setting to change, in one line) and `--help` showing every option's default.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from service.cli import build_parser
from tests.dicom_peers import free_port, have_dcmtk
from tests.node_harness import BEFUND, PROJECT, poll

README = PROJECT / "README.md"


def try_it_block() -> str:
    text = README.read_text()
    section = text[text.index("## Try it"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def copy_checkout(into: Path) -> Path:
    """The checkout's files as a clone would have them (tracked and new, nothing ignored)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = PROJECT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def offline_install(checkout: Path) -> None:
    """What `make install` leaves, without the network: .venv, befund from this checkout."""
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "befund-a-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "befund-b-checkout.pth").write_text(str(checkout) + "\n")
    script = venv / "bin" / "befund"
    script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom service.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    stamp = subprocess.run(["sh", "-c", "printf '%s' \"$(pwd -P)\" | cksum"], cwd=checkout,
                           capture_output=True, text=True, check=True).stdout.split()[0]
    (venv / f".checkout-{stamp}").touch()
    os.utime(script)  # newer than requirements.lock, pyproject.toml and the checkout stamp


def distinct_free_ports(n: int) -> list[int]:
    """n free ports, all different (each held open while the next is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.skipif(not have_dcmtk() or not shutil.which("make") or not shutil.which("curl"),
                    reason="needs dcmtk, make and curl")
def test_the_readme_try_it_block_runs_as_written_in_a_fresh_copy(tmp_path):
    checkout = copy_checkout(tmp_path / "befund")
    offline_install(checkout)
    dicom, pacs, http = distinct_free_ports(3)
    block = try_it_block()
    assert block.count("11112") == 2 and "11113" in block and "localhost:3000" in block
    script = block.replace("11112", str(dicom)).replace("11113", str(pacs)).replace(
        "localhost:3000", f"localhost:{http}")
    (checkout / "try-it.sh").write_text("set -eu\n" + script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEFUND_", "VIRTUAL_ENV"))}
    env.update(BEFUND_DICOM_PORT=str(dicom), BEFUND_HTTP_PORT=str(http), BEFUND_LOG_LEVEL="INFO",
               PATH=os.environ["PATH"])
    log = checkout / "try-it.log"  # a file, not a pipe: the block's background jobs keep it open
    with log.open("wb") as out:
        shell = subprocess.Popen(["bash", "try-it.sh"], cwd=checkout, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    group = shell.pid
    try:
        shell.wait(timeout=600)
        output = log.read_text(errors="replace")
        assert shell.returncode == 0, output[-4000:]
        assert "sent 40 instance(s), 0 failed" in output
        # the node logs to the same terminal: read the JSON where it starts, lines as whole
        studies = json.JSONDecoder().raw_decode(output[output.index('{"studies"'):])[0]["studies"]
        assert len(studies) == 2
        lines = [line.strip() for line in output.splitlines()]
        assert lines.count("ready") == 2 and "NOT READY" not in lines  # status --wait, then status
        results = poll(lambda: [p for p in (checkout / "var" / "pacs").rglob("*") if p.is_file()] or None,
                       180, 0.5, "results in the stand-in PACS")
        assert results
        # The node runs the copy's code, not this checkout's.
        cmdlines = []
        for pid in Path("/proc").iterdir():
            try:
                if pid.name.isdigit() and os.getpgid(int(pid.name)) == group:
                    cmdlines.append((pid / "cmdline").read_bytes().split(b"\0"))
            except (OSError, ProcessLookupError):
                continue
        serving = [c for c in cmdlines if b"--working-dir" in c]
        assert serving and all(c[c.index(b"--working-dir") + 1] == str(checkout).encode() for c in serving)
    finally:
        try:
            os.killpg(group, signal.SIGTERM)
            time.sleep(2)  # grace for the node to stop before the kill; not a synchronisation
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if shell.poll() is None:
            shell.wait(timeout=30)


def test_a_port_in_use_gives_one_line_naming_the_port_and_the_setting(tmp_path):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
        env.update(BEFUND_HTTP_PORT=str(port), BEFUND_DICOM_PORT=str(free_port()), BEFUND_VAR=str(tmp_path))
        proc = subprocess.run([str(BEFUND), "serve", "--host", "127.0.0.1"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"port {port} (http_port) is already in use" in lines[0] and "BEFUND_HTTP_PORT" in lines[0]


def test_every_subcommand_option_shows_its_default_in_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse's own tree
    parsers = dict(commands)
    for name, sub in commands["phantom"]._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        parsers[f"phantom {name}"] = sub
    for name, sub in parsers.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:  # noqa: SLF001
            if not action.option_strings or action.dest == "help":
                continue
            option = action.option_strings[-1]
            shown = text[text.index(option, text.index("options:")):]
            assert "default" in shown.split(" --")[0], f"befund {name} {option}: no default in --help"


def test_a_copied_checkout_reinstalls_its_own_code_before_it_runs(tmp_path):
    """`make run` in a copy whose .venv was made for another folder installs the copy first."""
    checkout = copy_checkout(tmp_path / "copy")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / ".checkout-1").touch()  # made for some other folder
    (checkout / ".venv" / "bin" / "befund").touch()
    dry = subprocess.run(["make", "-n", "run"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "pip install -q --no-deps -e ." in dry.stdout and "-m pip" in dry.stdout
    assert dry.stdout.index("-e .") < dry.stdout.index("befund serve")


@pytest.mark.skipif(not have_dcmtk() or not Path("/usr/sbin/Orthanc").exists(),
                    reason="needs dcmtk and orthanc")
def test_befund_status_during_the_demo_asks_the_demos_node_with_its_token(tmp_path):
    """`make demo` in one terminal, `befund status` in another, same folder: it answers ready."""
    http, dicom = distinct_free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
    env.update(BEFUND_HTTP_PORT=str(http), BEFUND_DICOM_PORT=str(dicom))
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "service.demo", "--workdir", str(tmp_path / "demo")],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        poll(lambda: "befund status" in log.read_text(errors="replace") or demo.poll() is not None,
             300, 0.5, "the demo's results")
        assert demo.poll() is None, log.read_text(errors="replace")[-3000:]
        status = subprocess.run([str(BEFUND), "status"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.strip().endswith("ready")
        assert (tmp_path / "var" / "token").exists()  # the demo's token, where befund status looks
    finally:
        demo.send_signal(signal.SIGTERM)  # stops befund and Orthanc, as Ctrl-C does
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=30)
