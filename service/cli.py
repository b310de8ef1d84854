"""`befund`: serve the node, write phantoms, send a folder of DICOM files.

    befund serve [--config befund.yaml]
    befund phantom ct --out DIR --finding subdural --slices 40 --seed 1 [--transfer-syntax rle]
    befund phantom wsi --out DIR --width 8192 --height 6144 --tumor 0.2 --seed 1
    befund send DIR --to BEFUND@127.0.0.1:11112
    befund status [--config befund.yaml]   (exit 0 ready, 1 not ready, 2 no answer)
"""

from __future__ import annotations

import argparse
import os
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


def cmd_serve(args: argparse.Namespace) -> int:
    from service.private_files import keep_files_private

    config = _config(args)  # fail here, with the message, not inside a worker
    keep_files_private()  # inherited by BentoML's arbiter and every worker (patient data)
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
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.gateway:Gateway",
           "--port", str(config.http_port), "--host", args.host,
           "--working-dir", str(PROJECT_ROOT)]
    if config.http_tls.enabled:  # uvicorn of the gateway's worker speaks TLS on the HTTP port
        cmd += ["--ssl-certfile", str(Path(config.http_tls.cert).resolve()),
                "--ssl-keyfile", str(Path(config.http_tls.key).resolve())]
    scheme = "HTTPS" if config.http_tls.enabled else "HTTP"
    print(f"befund: DICOM {config.ae_title} on port {config.dicom_port}, "
          f"{scheme} on port {config.http_port}, state under {os.environ['BEFUND_VAR_DIR']}", flush=True)
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
    each check. For a shell or a systemd health check on the node's own machine."""
    import json
    import urllib.error
    import urllib.request

    config = _config(args)
    token = config.stored_token()
    scheme = "https" if config.http_tls.enabled else "http"
    url = (args.url or f"{scheme}://127.0.0.1:{config.http_port}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must be an http:// or https:// address, not {url}")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        f"{url}/status", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10,  # noqa: S310 - checked above
                                    context=_node_tls_context(config)) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code != 503:
            print(f"befund: {url}/status answered {e.code}", file=sys.stderr)
            return 2
        body = json.loads(e.read())
    except (urllib.error.URLError, OSError) as e:
        print(f"befund: no answer from {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 2
    for check in body["checks"]:
        print(f"{'ok  ' if check['ok'] else 'FAIL'}  {check['name']:<10}  {check['detail']}")
    print("ready" if body["ready"] else "NOT READY" + ("" if body["alive"] else " (and not alive)"))
    return 0 if body["ready"] else 1


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
    p = argparse.ArgumentParser(prog="befund", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the node (BentoML gateway + model service)")
    s.add_argument("--config", help="YAML config (default: befund.yaml if present)")
    s.add_argument("--host", default="0.0.0.0", help="HTTP bind address")
    s.set_defaults(func=cmd_serve)

    ph = sub.add_parser("phantom", help="write synthetic DICOM for tests and demos")
    kinds = ph.add_subparsers(dest="kind", required=True)
    ct = kinds.add_parser("ct", help="a head-CT series")
    ct.add_argument("--out", required=True)
    ct.add_argument("--finding", default="none",
                    choices=["none", "intraparenchymal", "subdural", "epidural", "subarachnoid"])
    ct.add_argument("--slices", type=int, default=32)
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--transfer-syntax", default="explicit",
                    choices=["explicit", "implicit", "jpeg-lossless", "j2k-lossless", "rle"])
    ct.set_defaults(func=cmd_phantom)
    wsi = kinds.add_parser("wsi", help="a whole-slide image (H&E)")
    wsi.add_argument("--out", required=True)
    wsi.add_argument("--width", type=int, default=8192)
    wsi.add_argument("--height", type=int, default=6144)
    wsi.add_argument("--tumor", type=float, default=0.0)
    wsi.add_argument("--seed", type=int, default=0)
    wsi.add_argument("--tiling", default="full", choices=["full", "sparse"])
    wsi.add_argument("--codec", default="jpeg", choices=["jpeg", "j2k"])
    wsi.add_argument("--label", action="store_true")
    wsi.add_argument("--overview", action="store_true")
    wsi.set_defaults(func=cmd_phantom)

    snd = sub.add_parser("send", help="C-STORE a folder of DICOM files")
    snd.add_argument("folder")
    snd.add_argument("--to", required=True, help="AE@host:port")
    snd.add_argument("--calling-ae", default="BEFUNDSCU")
    snd.add_argument("--quiet", action="store_true")
    snd.set_defaults(func=cmd_send)

    st = sub.add_parser("status", help="print the running node's checks (exit 1 when not ready)")
    st.add_argument("--config", help="YAML config (default: befund.yaml if present)")
    st.add_argument("--url", help="the node's HTTP address (default: http://127.0.0.1:<http_port>)")
    st.set_defaults(func=cmd_status)
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
