"""The node's HTTP side against hostile clients, over real sockets to the REAL node.

One node serves most tests (module fixture); each test uses its own client address where a
limit per address could spill over (127.0.0.2 and .3 reach the node on 127.0.0.1). What must
hold: unauthenticated floods of long random paths leave the gateway's memory and `/metrics`
flat and free of request text; wrong tokens are throttled per address with a log line; the
login cookie is a session that `/logout` ends; cookie-borne POSTs from another origin are
refused; `next=` never breaks a response; paths reach the log escaped and cut; JSON and the
worklist are not cached; HTTPS with a Secure cookie; short tokens are refused at start.
"""

from __future__ import annotations

import http.client
import random
import re
import string
import subprocess
import threading
from urllib.parse import quote

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from service.http_api import API_ROUTES
from service.login_throttle import FailureThrottle
from service.sessions import SessionTable
from tests.dicom_peers import free_port, have_dcmtk, run_storescu
from tests.node_harness import BEFUND, TOKEN, RunningNode, poll, rss_bytes
from tests.tls_certs import have_openssl, make_tls_files

MARK = "zqxhostile"  # in every attacker path: it must never reach /metrics
MARK_UID = "1.2.826.0.1.3680043.10.999"  # the root of every attacker "UID"
FLOOD = 10_000
BATCH = 500
MAX_GROWTH = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with RunningNode(tmp_path_factory.mktemp("http") / "node") as n:
        yield n


Answer = tuple[int, http.client.HTTPMessage, bytes]


def request(node: RunningNode, method: str, path: str, headers: dict | None = None,
            body: bytes | None = None, source: str = "127.0.0.1") -> Answer:
    """One request on a fresh connection from `source`; (status, headers, body)."""
    if node.tls:
        conn = http.client.HTTPSConnection("127.0.0.1", node.http_port, timeout=30,
                                           source_address=(source, 0), context=node.ssl_context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30,
                                          source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def origin(node: RunningNode) -> str:
    return f"{'https' if node.tls else 'http'}://127.0.0.1:{node.http_port}"


def post_login(node: RunningNode, token: str, next_path: str = "/", source: str = "127.0.0.1",
               headers: dict | None = None) -> Answer:
    form = f"token={quote(token, safe='')}&next={quote(next_path, safe='')}".encode()
    return request(node, "POST", "/login", {
        "Content-Type": "application/x-www-form-urlencoded", "Origin": origin(node),
        **(headers or {})}, form, source)


def session_cookie(set_cookie: str) -> str:
    match = re.match(r"befund_session=([^;]*);", set_cookie or "")
    assert match, f"no session cookie in {set_cookie!r}"
    return match.group(1)


def login(node: RunningNode, source: str = "127.0.0.1") -> str:
    status, headers, _ = post_login(node, TOKEN, source=source)
    assert status == 303, status
    return session_cookie(headers["set-cookie"])


def log_lines(node: RunningNode) -> list[str]:
    return node.log_path.read_text(errors="replace").splitlines()


# --- point 3: memory and /metrics under a flood of unauthenticated long paths ---------------

def _attack(conn: http.client.HTTPConnection, rng: random.Random) -> int:
    """One unauthenticated request with a long random path (half within the target limit)."""
    length = rng.randint(100, 2000) if rng.random() < 0.5 else rng.randint(2100, 30_000)
    kind = rng.randrange(4)
    uid = MARK_UID + "." + "".join(rng.choices(string.digits, k=max(1, length - 40)))[:length]
    headers = {"Accept": "application/json"}
    method = "GET"
    if kind == 0:
        path = f"/studies/{uid}"
    elif kind == 1:
        pieces = rng.choices([*string.ascii_letters, *string.digits, "-", "_", "%0a", "%C3%BC", "/"],
                             k=length // 2)
        path = f"/{MARK}/" + "".join(pieces)
    elif kind == 2:
        method, path = "POST", f"/studies/{uid}/run"
    else:
        path, headers = f"/view/{uid}", {"Accept": "text/html"}
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _flood(node: RunningNode, count: int, seed: int, threads: int = 4) -> set[int]:
    statuses: set[int] = set()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
        try:
            for _ in range(count // threads):
                statuses.add(_attack(conn, rng))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            conn.close()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[0]
    return statuses


def test_ten_thousand_unauthenticated_long_paths_leave_memory_and_metrics_flat(node):
    pid = node.gateway_pid()
    _flood(node, BATCH, seed=0)  # warm-up: first use of each route, thread pools, log buffers
    before = rss_bytes(pid)
    statuses: set[int] = set()
    for batch in range(FLOOD // BATCH):
        statuses |= _flood(node, BATCH, seed=batch + 1)
        growth = rss_bytes(pid) - before
        assert growth < MAX_GROWTH, f"gateway grew {growth >> 20} MB after {(batch + 1) * BATCH} requests"
    assert statuses <= {303, 401, 404, 414}, statuses
    assert {401, 414} <= statuses
    growth = rss_bytes(pid) - before
    print(f"gateway RSS growth after {FLOOD} requests: {growth / 2**20:.1f} MB")
    assert growth < MAX_GROWTH

    status, _, body = request(node, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and len(body) < 256 * 1024, len(body)
    assert MARK not in text and MARK_UID not in text
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text)  # no UID of any study either
    routes = set(re.findall(r'befund_http_requests_total\{[^}]*route="([^"]*)"', text))
    assert {"/studies/{study_uid}", "/studies/{study_uid}/run", "/view/{study_uid}", "unmatched"} <= routes
    assert routes <= {r.path for r in API_ROUTES} | {
        "/", "/view/{study_uid}", "/studies/{study_uid}/key-image.png", "/static/{path}", "/readyz",
        "/livez", "/healthz", "unmatched"}
    assert 'befund_http_refused_total{reason="target_too_long"}' in text


def test_request_heads_over_the_limits_are_refused_before_any_route(node):
    status, headers, body = request(node, "GET", "/studies/" + "1." * 1100 + "1")
    assert status == 414 and b"2048" in body and headers["cache-control"] == "no-store"
    status, _, body = request(node, "GET", "/studies", {"X-Filler": "a" * 20_000,
                                                        "Authorization": f"Bearer {TOKEN}"})
    assert status == 431 and b"16384" in body
    assert request(node, "GET", "/studies", {"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_an_encoded_newline_in_a_path_cannot_forge_a_log_line(node):
    forged = f"FORGED-{random.randrange(10**9)}"
    request(node, "GET", f"/nowhere%0a{forged}%20INFO%20befund:%20all%20fine")  # unmatched: 404
    request(node, "GET", f"/studies/1.2.3%0d%0a{forged}")  # a route's path: 401
    request(node, "GET", "/studies/" + "9" * 2000)  # a long one (within the target limit)
    poll(lambda: sum(f"%0A{forged}" in line for line in log_lines(node)) >= 2, 10, 0.1,
         "the escaped paths in the log")
    lines = log_lines(node)  # split at \n and \r alike
    assert not any(line.startswith(forged) for line in lines)
    longest = max(len(line) for line in lines)
    assert longest < 1000, f"a log line of {longest} characters"


# --- hardening: rate limit, sessions, CSRF, next=, caching, TLS, short tokens -----------------

def test_wrong_tokens_from_one_address_get_429_while_other_addresses_sign_in(node):
    attacker, colleague = "127.0.0.2", "127.0.0.3"
    for i in range(10):
        if i % 2:
            status = request(node, "GET", "/studies", {"Authorization": "Bearer guess-" + "x" * 32},
                             source=attacker)[0]
        else:
            status = post_login(node, f"guess-{i}-" + "y" * 32, source=attacker)[0]
        assert status == 401, (i, status)
    status, headers, body = post_login(node, TOKEN, source=attacker)  # even the right token
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60 and b"try again" in body
    assert "set-cookie" not in headers
    status, headers, _ = request(node, "GET", "/studies", {"Authorization": f"Bearer {TOKEN}"},
                                 source=attacker)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert request(node, "GET", "/studies", {"Authorization": f"Bearer {TOKEN}"},
                   source=colleague)[0] == 200
    cookie = login(node, source=colleague)
    assert request(node, "GET", "/studies", {"Cookie": f"befund_session={cookie}"},
                   source=colleague)[0] == 200
    poll(lambda: any("10 wrong tokens from 127.0.0.2" in line for line in log_lines(node)), 10, 0.1,
         "the throttle's log line")
    _, _, metrics = request(node, "GET", "/metrics")
    assert re.search(rb'befund_http_refused_total\{reason="throttled"\} [1-9]', metrics)


def test_the_login_cookie_is_a_random_session_that_logout_ends(node):
    status, headers, _ = post_login(node, TOKEN)
    assert status == 303
    set_cookie = headers["set-cookie"]
    first = session_cookie(set_cookie)
    assert TOKEN not in set_cookie and quote(TOKEN, safe="") not in set_cookie
    assert len(first) >= 40 and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    second = login(node)
    assert second != first
    as_browser = {"Accept": "application/json"}
    assert request(node, "GET", "/studies", {**as_browser, "Cookie": f"befund_session={first}"})[0] == 200
    for forged in (f"befund_session={TOKEN}", f"befund_token={TOKEN}", "befund_session=" + "A" * 43):
        assert request(node, "GET", "/studies", {**as_browser, "Cookie": forged})[0] == 401, forged
    status, headers, _ = request(node, "GET", "/logout", {"Cookie": f"befund_session={first}"})
    assert status == 303 and "Max-Age=0" in headers["set-cookie"]
    assert request(node, "GET", "/studies", {**as_browser, "Cookie": f"befund_session={first}"})[0] == 401
    assert request(node, "GET", "/studies", {**as_browser, "Cookie": f"befund_session={second}"})[0] == 200


def test_cookie_borne_posts_from_another_origin_are_refused(node):
    cookie = {"Cookie": f"befund_session={login(node)}"}
    other_port = f"http://127.0.0.1:{node.http_port + 1}"  # same site: SameSite=Strict sends the cookie
    run, resend = "/studies/1.2.3.4/run", "/deliveries/987654/resend"
    for path in (run, resend):
        for headers in ({"Origin": other_port}, {"Origin": "null"}, {"Referer": other_port + "/x"},
                        {}, {"Origin": "http://evil.example"}):
            status, _, body = request(node, "POST", path, {**cookie, **headers})
            assert status == 403 and b"cross-origin" in body, (path, headers, status)
        # From the node's own page the request reaches the handler (404: nothing known by that id).
        assert request(node, "POST", path, {**cookie, "Origin": origin(node)})[0] == 404
        assert request(node, "POST", path, {**cookie, "Referer": origin(node) + "/view/1.2.3.4"})[0] == 404
        # A script with the token is not a browser: no Origin needed.
        assert request(node, "POST", path, {"Authorization": f"Bearer {TOKEN}"})[0] == 404
    status, _, _ = request(node, "POST", "/logout", {**cookie, "Origin": other_port})
    assert status == 403
    assert request(node, "GET", "/studies", cookie)[0] == 200  # the session is still there
    status, headers, _ = post_login(node, TOKEN, headers={"Origin": other_port})
    assert status == 403 and "set-cookie" not in headers
    assert any("is not this node's" in line for line in log_lines(node))


def test_login_next_with_crlf_or_non_ascii_gives_a_safe_redirect(node):
    cases = {"/\r\nX-Injected: 1": "/", "/\u00fcber": "/", "/view/\u0000": "/", "//evil.example/": "/",
             "/%0d%0aX-Injected:%201": "/%0d%0aX-Injected:%201"}  # still encoded: a path, not a header
    for target, location in cases.items():
        status, headers, _ = post_login(node, TOKEN, next_path=target)
        assert status == 303 and headers["location"] == location and "x-injected" not in headers, target
        status, _, page = request(node, "GET", "/login?next=" + quote(target, safe=""))
        assert status == 200 and f'name="next" value="{location}"'.encode() in page, target
    status, headers, _ = request(node, "GET", "/view/%C3%BC%0d%0a", {"Accept": "text/html"})
    assert status == 303 and headers["location"] == "/login?next=%2Fview%2F%C3%BC%0D%0A"


@pytest.mark.skipif(not have_dcmtk(), reason="needs DCMTK's storescu")
def test_json_with_patient_data_and_the_worklist_are_not_cached(node, tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=3, seed=611, patient_name="Cache^Carla")
    assert run_storescu(files, port=node.dicom_port, timeout=120).returncode == 0
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    poll(lambda: request(node, "GET", f"/studies/{uid}", auth)[0] == 200, 30, 0.2, "the study's row")
    for path in ("/studies", f"/studies/{uid}", "/status", "/models", "/studies/9.9.9"):
        status, headers, body = request(node, "GET", path, auth)
        assert headers["cache-control"] == "no-store", (path, status)
    assert b"Cache^Carla" in request(node, "GET", f"/studies/{uid}", auth)[2]
    for path in ("/", f"/view/{uid}"):
        status, headers, _ = request(node, "GET", path, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and headers["cache-control"] == "no-store"


@pytest.mark.skipif(not have_openssl(), reason="needs openssl for the test certificates")
def test_https_node_serves_api_and_worklist_and_its_cookie_is_secure(tmp_path):
    tls = make_tls_files(tmp_path / "certs")
    with RunningNode(tmp_path / "node", http_ca=str(tls.ca_cert),
                     http_tls={"cert": str(tls.server_cert), "key": str(tls.server_key)}) as node:
        assert node.url.startswith("https://")
        assert node.api("/studies")[0] == 200
        status, headers, _ = post_login(node, TOKEN)
        assert status == 303 and "; Secure" in headers["set-cookie"]
        cookie = session_cookie(headers["set-cookie"])
        status, headers, page = request(node, "GET", "/", {"Cookie": f"befund_session={cookie}"})
        assert status == 200 and b"worklist" in page
        plain = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/studies", headers={"Authorization": f"Bearer {TOKEN}"})
            plain.getresponse().read()
        plain.close()
        cli = node.befund_status()  # `befund status` reads http_tls and pins the node's certificate
        assert cli.returncode == 0, cli.stdout + cli.stderr


def test_tokens_shorter_than_32_characters_stop_the_node_at_start(tmp_path):
    config = tmp_path / "befund.yaml"
    config.write_text(f"token: too-short-a-token\nvar_dir: {tmp_path / 'var'}\n"
                      f"http_port: {free_port()}\ndicom_port: {free_port()}\n")
    proc = subprocess.run([str(BEFUND), "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "token" in proc.stderr and "32" in proc.stderr
    assert not (tmp_path / "var").exists()


# --- the two tables behind the gate, on a clock the test turns ---------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_throttle_opens_again_when_the_oldest_failure_leaves_the_minute():
    clock = Clock()
    throttle = FailureThrottle(3, 60.0, max_addresses=2, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("a") == 0
        throttle.failed("a")
        clock.now += 10
    assert throttle.retry_after("a") == 30  # the first failure leaves the window at +60 s
    assert throttle.retry_after("b") == 0
    clock.now += 30
    assert throttle.retry_after("a") == 0
    throttle.failed("b")
    throttle.failed("c")  # a third address: the least recent one is forgotten, the table stays at 2
    assert len(throttle._failures) == 2


def test_sessions_expire_and_the_table_stays_bounded():
    clock = Clock()
    table = SessionTable(lifetime_s=3600, max_sessions=3, clock=clock)
    first = table.create()
    assert table.valid(first) and not table.valid(first[:-1] + "x") and not table.valid("")
    clock.now += 3599
    assert table.valid(first)
    clock.now += 1
    assert not table.valid(first)
    values = [table.create() for _ in range(5)]
    assert len(table) == 3 and not table.valid(values[0]) and table.valid(values[-1])
    assert table.end(values[-1]) and not table.valid(values[-1])


def test_short_tokens_and_half_tls_configs_are_refused_by_key(tmp_path, monkeypatch):
    from service.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)  # no befund.yaml of the working tree
    with pytest.raises(ConfigError, match=r"token: 21 characters is too short, use at least 32"):
        load_config(env={"BEFUND_TOKEN": "test-token-not-secret"})
    assert load_config(env={"BEFUND_TOKEN": "x" * 32}).token == "x" * 32
    path = tmp_path / "befund.yaml"
    path.write_text(f"http_tls: {{cert: {tmp_path / 'cert.pem'}}}\n")
    with pytest.raises(ConfigError, match="http_tls needs both cert and key"):
        load_config(path, env={})
    path.write_text(f"http_tls: {{cert: {tmp_path / 'cert.pem'}, key: {tmp_path / 'key.pem'}}}\n")
    with pytest.raises(ConfigError, match=r"http_tls.cert: .* is not a file"):
        load_config(path, env={})

