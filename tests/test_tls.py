"""DICOM TLS in and out, with certificates made for the test and DCMTK's storescu/storescp +tls.

The listener's TLS handshake runs per connection, off the accept path: a client that connects
and never speaks must not hold up anybody else (DESIGN.md, pynetdicom facts).
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from service.config import Config, Destination, TlsConfig
from service.dicom_listener import DicomListener
from service.node import Node
from service.outbox import cstore_files
from service.spool import Spool
from tests.dicom_peers import StoreSCP, have_dcmtk, run_echoscu, run_storescu
from tests.test_dicom_listener import Recorder, make_ct, wait_until
from tests.tls_certs import have_openssl, make_tls_files

pytestmark = pytest.mark.skipif(not (have_dcmtk() and have_openssl()), reason="needs DCMTK and openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_node(tmp_path, certs, caplog):
    """Start a listener with TLS on a free port; yields a factory, stops everything after."""
    started = []
    caplog.set_level("INFO", logger="befund")

    def start(**tls_overrides):
        tls = TlsConfig(enabled=True, port=0, cert=str(certs.server_cert), key=str(certs.server_key),
                        ca=str(certs.ca_cert), require_client_cert=True)
        cfg = Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(tmp_path / "var"),
                     tls=replace(tls, **tls_overrides))
        recorder = Recorder()
        listener = DicomListener(cfg, Spool(cfg.spool_path, 0), recorder.on_instance,
                                 recorder.on_association_end)
        listener.start()
        started.append(listener)
        return listener, recorder

    yield start
    for listener in started:
        listener.stop()


def tls_args(key, cert, ca) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def test_storescu_over_tls_with_client_certificate_is_stored(tls_node, certs, tmp_path):
    listener, rec = tls_node()
    result = run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.tls_port, timeout=20,
                          extra_args=tls_args(certs.client_key, certs.client_cert, certs.ca_cert))
    assert result.returncode == 0, result.output
    assert len(rec.instances) == 1
    # the plain port keeps working beside the TLS one
    assert run_echoscu(port=listener.port, timeout=20).returncode == 0


def test_silent_tls_client_does_not_block_others(tls_node, certs, tmp_path):
    listener, rec = tls_node(handshake_timeout_s=60.0)  # the silent ones stay connected throughout
    silent = [socket.create_connection(("127.0.0.1", listener.tls_port)) for _ in range(3)]
    try:
        started = time.monotonic()
        result = run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.tls_port, timeout=20,
                              extra_args=tls_args(certs.client_key, certs.client_cert, certs.ca_cert))
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.output
        assert seconds < 30.0, f"a TLS client behind silent ones took {seconds:.1f} s"  # blocked: 60 s
        assert len(rec.instances) == 1
    finally:
        for s in silent:
            s.close()


def test_silent_tls_client_is_dropped_after_the_handshake_timeout(tls_node, caplog):
    listener, _ = tls_node(handshake_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", listener.tls_port)) as s:
        s.settimeout(10)
        started = time.monotonic()
        assert s.recv(1) == b""  # the node closed it
        assert time.monotonic() - started < 8  # recv's own timeout is 10 s
    # ssl closes the socket before the failure reaches our handler: the log line may trail the close
    wait_until(lambda: "no handshake before the timeout" in caplog.text, 5)


@pytest.mark.parametrize("who", ["anonymous", "rogue certificate"])
def test_client_without_a_trusted_certificate_is_refused(tls_node, certs, tmp_path, caplog, who):
    listener, rec = tls_node()
    args = (["+tla", "+cf", str(certs.ca_cert)] if who == "anonymous"
            else tls_args(certs.rogue_key, certs.rogue_cert, certs.ca_cert))
    result = run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.tls_port, timeout=20,
                          extra_args=args)
    assert result.returncode != 0
    assert rec.instances == []
    wait_until(lambda: "TLS connection from 127.0.0.1 dropped" in caplog.text, 5)


def test_plain_dicom_on_the_tls_port_is_refused(tls_node, tmp_path):
    listener, rec = tls_node(handshake_timeout_s=2.0)
    result = run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.tls_port, timeout=20)
    assert result.returncode != 0 and rec.instances == []


def test_results_go_out_over_tls_to_a_tls_pacs(certs, tmp_path):
    cfg = Config(tls=TlsConfig(enabled=True, cert=str(certs.client_cert), key=str(certs.client_key),
                               ca=str(certs.ca_cert)))
    context = Node._client_tls(SimpleNamespace(config=cfg))  # the node's own outgoing TLS context
    assert context is not None
    pacs_args = ["+tls", str(certs.server_key), str(certs.server_cert), "+cf", str(certs.ca_cert)]
    with StoreSCP(tmp_path / "pacs", extra_args=pacs_args) as scp:
        dest = Destination(scp.ae, "127.0.0.1", scp.port, tls=True)
        cstore_files(dest, "BEFUND", [str(make_ct(tmp_path / "r.dcm"))], 20, context)
    assert len(list((tmp_path / "pacs").iterdir())) == 1
