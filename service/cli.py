"""`befund`: serve the node, write phantoms, send a folder of DICOM files.

    befund serve [--config befund.yaml] [--role all|receiver|worker|models]
    befund phantom ct --out DIR --finding subdural --slices 40 --seed 1 [--transfer-syntax rle]
    befund phantom wsi --out DIR --width 8192 --height 6144 --tumor 0.2 --seed 1
    befund send DIR --to BEFUND@127.0.0.1:11112
    befund status [--config befund.yaml]   (exit 0 ready, 1 not ready, 2 no answer)
    befund user add NAME --role radiologist|admin|ml [--password-stdin]
    befund user list | befund user disable NAME
    befund model check|bench|evaluate DIR ...   (befund model --help)
    befund model shadow-report NAME [--since 7d]
"""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _config(args: argparse.Namespace) -> Config:
    """The config `--config` names (else befund.yaml if present), with environment overrides."""
    from service.config import load_config

    if args.config:
        os.environ["BEFUND_CONFIG"] = str(Path(args.config).resolve())
    return load_config()


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help already names it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001 - argparse has no public name
            return f"{text} (default: off)"
        return f"{text} (default: {action.default})"


def ports_in_use(config: Config, http_host: str) -> list[str]:
    """One line per port the node needs that something else holds: the port and its setting."""
    wanted = [(http_host, config.http_port, "http_port")]
    if config.role in ("all", "receiver"):  # the roles that take DICOM
        wanted.append((config.dicom_host, config.dicom_port, "dicom_port"))
    if config.tls.enabled and config.role in ("all", "receiver"):
        wanted.append((config.dicom_host, config.tls.port, "tls.port"))
    lines = []
    for host, port, key in wanted:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers will
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                env = "BEFUND_" + key.upper() if "." not in key else "the tls section"
                lines.append(f"befund: port {port} ({key}) is already in use; stop what holds it or "
                             f"set another {key} in befund.yaml (or {env})")
    return lines


def startup_lines(config: Config, http_host: str, var_dir: str) -> list[str]:
    """What the operator needs at start: where results go (or that they go nowhere), the token
    and the worklist's address."""
    from service.delivery_rules import summary

    scheme = "https" if config.http_tls.enabled else "http"
    shown_host = "127.0.0.1" if http_host in ("0.0.0.0", "::", "") else http_host
    where = summary(config)
    lines = [f"befund: results go to {'; '.join(where['targets'])}" if where["targets"]
             else f"befund: WARNING {where['notice']}"]
    token = "set in the config" if config.token else f"in {Path(var_dir) / 'token'}"
    lines.append(f"befund: worklist {scheme}://{shown_host}:{config.http_port}/ ; API token {token}")
    return lines


def check_models(config: Config) -> None:
    """Refuse to start (ValueError, with the message) when the model cards cannot run together
    (pipelines/model_lineup.py) or `site_thresholds` names a model no card under models_dir
    has; print what is not run and why."""
    from pipelines.model_lineup import model_lineup
    from service.site_thresholds import unknown_models

    lineup = model_lineup(config.models_dir)
    for folder, why in lineup.retired.items():
        print(f"befund: model {folder} not run: {why}", flush=True)
    for card in lineup.cards:
        if card.mode == "shadow":
            print(f"befund: model {card.key} runs in shadow mode (kept, never delivered)", flush=True)
    known = lineup.known_keys()
    missing = unknown_models(config.site_thresholds, known)
    if missing:
        raise ValueError(f"site_thresholds: {', '.join(missing)} names no model under "
                         f"{config.models_dir} (known: {', '.join(sorted(known)) or 'none'})")


def cmd_serve(args: argparse.Namespace) -> int:
    from service.private_files import keep_files_private

    if args.role:
        os.environ["BEFUND_ROLE"] = args.role  # the workers read the role from the config
    config = _config(args)  # fail here, with the message, not inside a worker
    check_models(config)  # two active versions of a model, thresholds for no model: the same
    keep_files_private()  # inherited by BentoML's arbiter and every worker (patient data)
    busy = ports_in_use(config, args.host)
    if busy:
        print("\n".join(busy), file=sys.stderr)
        return 2
    # Workers may start elsewhere: hand them absolute paths.
    os.environ["BEFUND_VAR_DIR"] = str(Path(config.var_dir).resolve())
    os.environ["BEFUND_MODELS_DIR"] = str(Path(config.models_dir).resolve())
    for key in ("spool_dir", "results_dir"):
        if getattr(config, key):
            os.environ[f"BEFUND_{key.upper()}"] = str(Path(getattr(config, key)).resolve())
    # A BentoML home per node: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir
    # when it starts, so two nodes on one machine sharing ~/bentoml erased each other's
    # metrics, and each node's /metrics showed the other's (raw paths of an older node included).
    os.environ.setdefault("BENTOML_HOME", os.environ["BEFUND_VAR_DIR"] + "/bentoml")
    # role models: the model service alone (a GPU host); any other: the gateway, which runs
    # the model service beside it unless it only receives or has remote ones (service/gateway.py)
    service = "service.model_service:ModelService" if config.role == "models" else "service.gateway:Gateway"
    cmd = [sys.executable, "-m", "bentoml", "serve", service,
           "--port", str(config.http_port), "--host", args.host,
           "--working-dir", str(PROJECT_ROOT)]
    if config.http_tls.enabled:  # uvicorn of the gateway's worker speaks TLS on the HTTP port
        cmd += ["--ssl-certfile", str(Path(config.http_tls.cert).resolve()),
                "--ssl-keyfile", str(Path(config.http_tls.key).resolve())]
    scheme = "HTTPS" if config.http_tls.enabled else "HTTP"
    if config.role == "models":
        print(f"befund: model service on port {config.http_port} (role models)", flush=True)
        os.execv(sys.executable, cmd)  # noqa: S606 - replace this process with the server
    dicom = (f"DICOM {config.ae_title} on port {config.dicom_port} ({config.receiver_processes} "
             "process(es))" if config.role != "worker" else "no DICOM (role worker)")
    print(f"befund: role {config.role}, {dicom}, "
          f"{scheme} on port {config.http_port}, state under {os.environ['BEFUND_VAR_DIR']}", flush=True)
    print("\n".join(startup_lines(config, args.host, os.environ["BEFUND_VAR_DIR"])), flush=True)
    os.execv(sys.executable, cmd)  # noqa: S606 - replace this process with the server
    return 0  # not reached


def cmd_phantom(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.kind == "ct":
        from phantoms.ct_head import write_ct_series

        paths = write_ct_series(out, finding=args.finding, slices=args.slices, seed=args.seed,
                                transfer_syntax=args.transfer_syntax)
    else:
        from phantoms.wsi_slide import write_wsi_slide

        paths = write_wsi_slide(out, width=args.width, height=args.height, tumor=args.tumor,
                                seed=args.seed, tiling=args.tiling, codec=args.codec,
                                label=args.label, overview=args.overview)
    from phantoms.ground_truth import write_truth

    if args.kind == "ct":  # the truth beside the files: `befund model evaluate` reads it
        write_truth(out, "ct", finding=args.finding, slices=args.slices, seed=args.seed)
    else:
        write_truth(out, "wsi", tumor=args.tumor, seed=args.seed, width=args.width, height=args.height)
    print(f"wrote {len(paths)} instance(s) to {out}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from service.config import Destination
    from service.dicom_sender import send_folder

    dest = Destination.parse(args.to)
    sent, failed = send_folder(Path(args.folder), dest, calling_ae=args.calling_ae,
                               progress=not args.quiet)
    print(f"sent {sent} instance(s), {len(failed)} failed")
    for path, why in failed[:20]:
        print(f"  {path}: {why}", file=sys.stderr)
    return 0 if not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Ask the running node's `GET /status` with the token from its config or var dir; print
    each check. For a shell or a systemd health check on the node's own machine. With
    `--wait S`, ask once a second until the node is ready or S seconds have passed (a script
    that starts the node waits for it this way)."""
    import time

    config = _config(args)
    scheme = "https" if config.http_tls.enabled else "http"
    url = (args.url or f"{scheme}://127.0.0.1:{config.http_port}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must be an http:// or https:// address, not {url}")
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        body, problem = _ask_status(config, url)
        if (body is not None and body["ready"]) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)  # poll interval under the --wait deadline
    if body is None:
        print(f"befund: {problem}", file=sys.stderr)
        return 2
    for check in body["checks"]:
        print(f"{'ok  ' if check['ok'] else 'FAIL'}  {check['name']:<10}  {check['detail']}")
    notice = (body.get("deliveries") or {}).get("notice")
    if notice:
        print(f"WARNING  {notice}")
    print("ready" if body["ready"] else "NOT READY" + ("" if body["alive"] else " (and not alive)"))
    return 0 if body["ready"] else 1


def _ask_status(config: Config, url: str) -> tuple[dict | None, str]:
    """(GET /status's body, "") or (None, why there is none). The token is read each time:
    a node on its first start writes var/token only once it runs."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - the caller checked the scheme
        f"{url}/status", headers={"Authorization": f"Bearer {config.stored_token()}"})
    try:
        with urllib.request.urlopen(request, timeout=10,  # noqa: S310 - checked by the caller
                                    context=_node_tls_context(config)) as r:
            return json.loads(r.read()), ""
    except urllib.error.HTTPError as e:
        if e.code != 503:
            return None, f"{url}/status answered {e.code}"
        return json.loads(e.read()), ""
    except (urllib.error.URLError, OSError) as e:
        return None, f"no answer from {url}: {getattr(e, 'reason', e)}"


def cmd_user(args: argparse.Namespace) -> int:
    """Accounts in the node's state DB; the running node sees a change at the next request."""
    from service.state_db import StateDB
    from service.users import UserError, UserStore

    config = _config(args)
    db = StateDB(config.db_path)
    try:
        users = UserStore(db)
        if args.action == "list":
            for row in users.list():
                print(f"{row['name']:<32} {row['role']:<12} {'disabled' if row['disabled'] else 'active'}")
            return 0
        if args.action == "disable":
            if not users.disable(args.name):
                print(f"befund: no user {args.name}", file=sys.stderr)
                return 1
            print(f"befund: user {args.name} disabled")
            return 0
        password = _new_password(args.password_stdin)
        try:
            who = users.add(args.name or "", args.role, password, replace=args.replace)
        except UserError as exc:
            print(f"befund: {exc}", file=sys.stderr)
            return 2
        print(f"befund: user {who.name} ({who.role}) {'updated' if args.replace else 'added'}")
        return 0
    finally:
        db.close()


def _new_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _node_tls_context(config: Config) -> ssl.SSLContext | None:
    """With `http_tls`, trust the certificates in the node's own cert file (its leaf, whoever
    signed it): the token goes only to a server that holds that key, addressed as 127.0.0.1
    or by any name. Without `http_tls`, the system's trust store, for an https `--url`."""
    if not config.http_tls.enabled:
        return None
    context = ssl.create_default_context(cafile=config.http_tls.cert)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the anchor
    context.check_hostname = False  # pinned to the certificate, not to a name
    return context


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="befund", description=__doc__, formatter_class=_Help)
    sub = p.add_subparsers(dest="command", required=True)
    config_help = ("YAML config (default: befund.yaml in the working directory if present, "
                   "else built-in defaults)")

    s = sub.add_parser("serve", help="start the node (BentoML gateway + model service)",
                       formatter_class=_Help)
    s.add_argument("--config", help=config_help)
    s.add_argument("--host", default="0.0.0.0", help="HTTP bind address")
    s.add_argument("--role", choices=["all", "receiver", "worker", "models"],
                   help="all: everything in one node (default, or the config's role); receiver: DICOM "
                        "in, spool and state DB; worker: completion, jobs, outbox; models: the model "
                        "service alone. Every role but models answers the API and worklist")
    s.set_defaults(func=cmd_serve)

    ph = sub.add_parser("phantom", help="write synthetic DICOM for tests and demos", formatter_class=_Help)
    kinds = ph.add_subparsers(dest="kind", required=True)
    ct = kinds.add_parser("ct", help="a head-CT series", formatter_class=_Help)
    ct.add_argument("--out", required=True, help="folder to write into (required; no default)")
    ct.add_argument("--finding", default="none", help="the bleed to draw",
                    choices=["none", "intraparenchymal", "subdural", "epidural", "subarachnoid"])
    ct.add_argument("--slices", type=int, default=32, help="number of axial slices")
    ct.add_argument("--seed", type=int, default=0, help="random seed (same seed, same series)")
    ct.add_argument("--transfer-syntax", default="explicit", help="how the pixels are encoded",
                    choices=["explicit", "implicit", "jpeg-lossless", "j2k-lossless", "rle"])
    ct.set_defaults(func=cmd_phantom)
    wsi = kinds.add_parser("wsi", help="a whole-slide image (H&E)", formatter_class=_Help)
    wsi.add_argument("--out", required=True, help="folder to write into (required; no default)")
    wsi.add_argument("--width", type=int, default=8192, help="slide width in pixels")
    wsi.add_argument("--height", type=int, default=6144, help="slide height in pixels")
    wsi.add_argument("--tumor", type=float, default=0.0, help="fraction of tissue that is tumor")
    wsi.add_argument("--seed", type=int, default=0, help="random seed")
    wsi.add_argument("--tiling", default="full", choices=["full", "sparse"],
                     help="DICOM dimension organisation")
    wsi.add_argument("--codec", default="jpeg", choices=["jpeg", "j2k"], help="frame compression")
    wsi.add_argument("--label", action="store_true", help="also write a label image")
    wsi.add_argument("--overview", action="store_true", help="also write an overview image")
    wsi.set_defaults(func=cmd_phantom)

    snd = sub.add_parser("send", help="C-STORE a folder of DICOM files", formatter_class=_Help)
    snd.add_argument("folder", help="folder of DICOM files (searched recursively)")
    snd.add_argument("--to", required=True, help="AE@host:port of the receiver (required; no default)")
    snd.add_argument("--calling-ae", default="BEFUNDSCU", help="our AE title")
    snd.add_argument("--quiet", action="store_true", help="no progress bar")
    snd.set_defaults(func=cmd_send)

    st = sub.add_parser("status", help="print the running node's checks (exit 1 when not ready)",
                        formatter_class=_Help)
    st.add_argument("--config", help=config_help)
    st.add_argument("--url", help="the node's HTTP address (default: http://127.0.0.1:<http_port>)")
    st.add_argument("--wait", type=float, default=0.0,
                    help="seconds to wait for the node to become ready (0: ask once)")
    st.set_defaults(func=cmd_status)

    us = sub.add_parser("user", help="add, list or disable the accounts that sign in to the worklist",
                        formatter_class=_Help)
    us.add_argument("action", choices=["add", "list", "disable"], help="what to do")
    us.add_argument("name", nargs="?", help="the user name (for add and disable)")
    us.add_argument("--role", default="radiologist", choices=["radiologist", "admin", "ml"],
                    help="radiologist: read and acknowledge; admin: resend, run, config and audit; "
                         "ml: model reports (default: radiologist)")
    us.add_argument("--password-stdin", action="store_true",
                    help="read the password from standard input instead of asking twice")
    us.add_argument("--replace", action="store_true", help="set a new role and password for an existing user")
    us.add_argument("--config", help=config_help)
    us.set_defaults(func=cmd_user)

    from service.model_tools.commands import add_model_parser
    from service.shadow_report_cli import add_shadow_report_parser

    # `befund model shadow-report` joins through `extra` (its parser lives with the shadow report)
    add_model_parser(sub, _Help, extra=[add_shadow_report_parser])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # config and argument errors: say what is wrong, no traceback
        print(f"befund: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
