"""Node configuration: defaults in one place, a YAML file on top, environment variables last.

Unknown keys are refused with the key's name, so a typo in `befund.yaml` fails at start-up
instead of silently running with a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.delivery_rules import DeliveryRule, check_rules, parse_rule
from service.site_thresholds import SiteThresholds, parse_site_thresholds

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: no backslash, no control
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a folder name in the spool


class ConfigError(ValueError):
    """A configuration value that the node cannot run with."""


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry: a calling AE title (or `*`) from a network (CIDR)."""

    ae_title: str = "*"
    network: str = "127.0.0.0/8"

    def permits(self, ae_title: str, address: str) -> bool:
        if self.ae_title != "*" and self.ae_title != ae_title.strip():
            return False
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.network, strict=False)
        except ValueError:
            return False


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives results (the PACS)."""

    ae_title: str
    host: str
    port: int
    name: str = "pacs"
    tls: bool = False

    @classmethod
    def parse(cls, text: str, name: str = "pacs") -> Destination:
        """Parse `AE@host:port`, the form used by `BEFUND_PACS` and `befund send --to`."""
        m = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text.strip())
        if not m:
            raise ConfigError(f"destination {text!r} is not of the form AE@host:port")
        return cls(ae_title=m.group(1), host=m.group(2), port=int(m.group(3)), name=name)


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS: certificate and key for the listener, CA bundle to verify peers."""

    enabled: bool = False
    port: int = 2762
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False
    handshake_timeout_s: float = 10.0  # a client silent for this long after connecting is dropped


@dataclass(frozen=True)
class HttpTlsConfig:
    """HTTPS for the HTTP API and worklist: certificate (chain) and key, PEM. Empty: plain HTTP."""

    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class DeliveryConfig:
    """Outbox retry policy: exponential backoff with jitter, then dead letter."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    dead_letter_after_s: float = 24 * 3600.0
    timeout_s: float = 30.0
    lease_s: float = 300.0  # one instance sends an entry; another takes it over after this


@dataclass(frozen=True)
class Hl7Config:
    """An HL7 v2 receiver (RIS / worklist engine) reached over MLLP."""

    host: str = ""
    port: int = 0
    sending_facility: str = "BEFUND"
    receiving_application: str = "RIS"


@dataclass(frozen=True)
class Config:
    ae_title: str = "BEFUND"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    http_port: int = 3000
    var_dir: str = "var"
    models_dir: str = "models"
    database_url: str = ""  # empty: SQLite under var_dir; postgresql://...: several instances may share it
    database_pool_size: int = 16  # PostgreSQL connections of one instance
    database_timeout_s: float = 5.0  # PostgreSQL unreachable this long: the call fails (C-STORE 0xA700)
    instance_id: str = ""  # empty: <hostname>-<pid>; unique among instances that share a state DB
    spool_dir: str = ""  # empty: var_dir/spool; instances that share a state DB share it too (NFS, CephFS)
    results_dir: str = ""  # empty: var_dir/results; shared like spool_dir when spool_dir is set
    token: str = ""  # empty: generated once and kept in var_dir/token
    # Scale (README "Scale"): what this instance does, and how many processes receive DICOM.
    role: str = "all"  # all | receiver | worker | models (`befund serve --role`)
    receive_workers: int = 0  # processes on dicom_port; 0: one per core with PostgreSQL, 1 with SQLite
    model_services: tuple[str, ...] = ()  # http://gpu1:3001, ...; empty: the model service started here
    model_call_timeout_s: float = 1800.0  # one series' analysis at a remote model service, at most
    allow: tuple[AllowRule, ...] = (AllowRule("*", "127.0.0.0/8"), AllowRule("*", "::1/128"))
    destinations: tuple[Destination, ...] = ()
    delivery_rules: tuple[DeliveryRule, ...] = ()  # who gets which results (service/delivery_rules.py)
    # a model's threshold per sending site (calling AE, institution): service/site_thresholds.py
    site_thresholds: tuple[SiteThresholds, ...] = ()
    settle_s: float = 2.0
    quiet_s: float = 30.0
    max_associations: int = 32
    max_pdu: int = 262144
    network_timeout_s: float = 60.0  # an association silent this long (e.g. stalled mid-transfer) is dropped
    # Before an association (service/connection_gate.py): what one host can make the listener hold.
    association_request_timeout_s: float = 5.0  # a new connection must send its whole A-ASSOCIATE-RQ by then
    max_associate_rq_bytes: int = 256 * 1024  # a longer A-ASSOCIATE-RQ is a protocol error (A-ABORT)
    max_connections_per_address: int = 16  # open DICOM connections from one address, associated or not
    listen_backlog: int = 1024  # connections the kernel queues until accepted (capped by net.core.somaxconn)
    peer_log_interval_s: float = 10.0  # one log line per peer address and kind of refusal in this time
    max_instance_bytes: int = 8 * 1024**3
    min_free_bytes: int = 1024**3
    retention_hours: float = 168.0
    job_lease_s: float = 120.0
    job_max_attempts: int = 3
    job_workers: int = 2
    inference_provider: str = "cpu"  # cpu | cuda
    inference_threads: int = 0  # 0: cores minus one, at least one
    # Modules that register tasks from outside befund (pipelines/tasks/__init__.py), imported at
    # start by every process that loads this config; BEFUND_TASK_MODULES: comma-separated.
    task_modules: tuple[str, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    webhooks: tuple[str, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)
    http_tls: HttpTlsConfig = field(default_factory=HttpTlsConfig)
    # HTTP limits (service/auth.py, service/http_edge.py); each is checked before the value is used.
    http_auth_failures_per_minute: int = 10  # wrong tokens per address and minute; beyond: 429
    http_session_hours: float = 12.0  # a browser login lasts one shift; /logout ends it sooner
    http_max_sessions: int = 1000  # logins held at once; the oldest is dropped beyond this
    http_max_target_bytes: int = 2048  # path and query of one request (a UID path is < 100); longer: 414
    http_max_header_bytes: int = 16384  # all request headers together; more: 431
    # test hook, refused unless BEFUND_TESTING=1: {series UID: stage} (service/job_failures.py)
    fault_injection: tuple[tuple[str, str], ...] = ()
    # test hook, refused unless BEFUND_TESTING=1: {stage: seconds} each job's stage waits first
    fault_delays: tuple[tuple[str, float], ...] = ()
    # The worklist (service/reader_rows.py, service/viewer_links.py, service/audit_log.py).
    viewer_url: str = ""  # e.g. "http://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}"; empty: no link
    audit_view_window_s: float = 60.0  # one audit entry per user, view and address within this

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir)

    @property
    def token_path(self) -> Path:
        return self.var_path / "token"

    def stored_token(self) -> str:
        """The HTTP API token: this config's, else the one kept in var_dir/token ("" if none yet)."""
        if self.token:
            return self.token
        return self.token_path.read_text().strip() if self.token_path.exists() else ""

    @property
    def spool_path(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else self.var_path / "spool"

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else self.var_path / "results"

    @property
    def instance(self) -> str:
        """This instance's name in leases and associations: `instance_id`, else hostname-pid."""
        if self.instance_id:
            return self.instance_id
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:48] or "befund"
        return f"{host}-{os.getpid()}"

    @property
    def receiver_processes(self) -> int:
        """How many processes listen on dicom_port: `receive_workers`, else one per core with
        PostgreSQL and one with SQLite (its wake-ups are in-process; service/receiver_pool.py)."""
        if self.receive_workers:
            return self.receive_workers
        return len(os.sched_getaffinity(0)) if self.database_url else 1  # the cores we may use

    @property
    def db_path(self) -> Path:
        return self.var_path / "state.sqlite"

    def is_allowed(self, ae_title: str, address: str) -> bool:
        return any(rule.permits(ae_title, address) for rule in self.allow)


_NESTED = {"delivery": DeliveryConfig, "hl7": Hl7Config, "tls": TlsConfig, "http_tls": HttpTlsConfig}

MIN_TOKEN_CHARS = 32  # a guessed token must be hopeless even without the login rate limit

ENV_PREFIX = "BEFUND_"


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = names[key]
        if key in _NESTED:
            kwargs[key] = _build(_NESTED[key], value or {}, f"{where}.{key}")
        elif key == "allow":
            kwargs[key] = tuple(_allow_rule(v) for v in value or ())
        elif key == "destinations":
            kwargs[key] = tuple(_destination(v) for v in value or ())
        elif key == "delivery_rules":
            try:
                kwargs[key] = tuple(parse_rule(v) for v in value or ())
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        elif key == "site_thresholds":
            try:
                kwargs[key] = parse_site_thresholds(value)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        elif key == "webhooks":
            kwargs[key] = tuple(str(v) for v in value or ())
        elif key == "task_modules":
            kwargs[key] = _task_modules(value)
        elif key == "model_services":
            items = value.split(",") if isinstance(value, str) else (value or ())
            kwargs[key] = tuple(str(v).strip().rstrip("/") for v in items if str(v).strip())
        elif key == "fault_injection":
            kwargs[key] = _fault_injection(value)
        elif key == "fault_delays":
            kwargs[key] = _fault_delays(value)
        else:
            kwargs[key] = _coerce(f, value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                return value.strip().lower() in {"1", "true", "yes", "on"}
            return bool(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {kind}") from exc


def _allow_rule(value: Any) -> AllowRule:
    if isinstance(value, str):
        ae, _, net = value.partition("@")
        value = {"ae_title": ae or "*", "network": net or "0.0.0.0/0"}
    rule = _build(AllowRule, value, "allow[]")
    try:
        ipaddress.ip_network(rule.network, strict=False)
    except ValueError as exc:
        raise ConfigError(f"allow: {rule.network!r} is not a network (use CIDR, e.g. 10.0.0.0/8)") from exc
    return rule


def _destination(value: Any) -> Destination:
    if isinstance(value, str):
        return Destination.parse(value)
    return _build(Destination, value, "destinations[]")


def _task_modules(value: Any) -> tuple[str, ...]:
    """A list of dotted module names, or one comma-separated string (the environment's form)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"task_modules: give a list of dotted module names, not {value!r}")
    return tuple(value)


def _fault_injection(value: Any) -> tuple[tuple[str, str], ...]:
    from service.job_failures import Stage

    if not isinstance(value, dict):
        raise ConfigError("fault_injection must map series UIDs to stages")
    stages = {s.value for s in Stage}
    for stage in value.values():
        if stage not in stages:
            raise ConfigError(f"fault_injection: {stage!r} is not a stage ({', '.join(sorted(stages))})")
    return tuple((str(series), str(stage)) for series, stage in value.items())


def _fault_delays(value: Any) -> tuple[tuple[str, float], ...]:
    from service.job_failures import Stage

    if not isinstance(value, dict):
        raise ConfigError("fault_delays must map stages to seconds")
    stages = {s.value for s in Stage}
    out = []
    for stage, seconds in value.items():
        if stage not in stages:
            raise ConfigError(f"fault_delays: {stage!r} is not a stage ({', '.join(sorted(stages))})")
        try:
            out.append((str(stage), float(seconds)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"fault_delays.{stage}: {seconds!r} is not a number of seconds") from exc
    return tuple(out)


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    """`BEFUND_<KEY>` sets a top-level scalar; `BEFUND_PACS=AE@host:port` sets the destination."""
    out: dict[str, Any] = {}
    scalar = {f.name for f in dataclasses.fields(Config)} - set(_NESTED) - {
        "allow", "destinations", "webhooks", "fault_injection", "fault_delays", "delivery_rules",
        "model_services", "site_thresholds"}
    for name in scalar:
        key = ENV_PREFIX + name.upper()
        if key in env:
            out[name] = env[key]
    if "BEFUND_VAR" in env:
        out["var_dir"] = env["BEFUND_VAR"]
    if env.get("BEFUND_PACS"):
        out["destinations"] = [env["BEFUND_PACS"]]
    if env.get("BEFUND_MODEL_SERVICES"):  # comma-separated URLs
        out["model_services"] = env["BEFUND_MODEL_SERVICES"]
    if env.get("BEFUND_ALLOW"):
        out["allow"] = [r for r in env["BEFUND_ALLOW"].split(",") if r.strip()]
    return out


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Load defaults <- YAML file <- environment. `path=None` uses `$BEFUND_CONFIG` or `befund.yaml`."""
    env = dict(os.environ if env is None else env)
    data: dict[str, Any] = {}
    if path is None:
        path = env.get("BEFUND_CONFIG") or ("befund.yaml" if Path("befund.yaml").exists() else None)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data.update(loaded)
    data.update(_env_overrides(env))
    cfg = _build(Config, data, str(path or "config"))
    if not AE_TITLE_RE.match(cfg.ae_title):
        raise ConfigError(f"ae_title {cfg.ae_title!r} is not a valid AE title (1-16 characters)")
    if cfg.inference_provider not in {"cpu", "cuda"}:
        raise ConfigError(f"inference_provider must be cpu or cuda, not {cfg.inference_provider!r}")
    _check_http(cfg)
    _check_state(cfg)
    _check_scale(cfg)
    if (cfg.fault_injection or cfg.fault_delays) and env.get("BEFUND_TESTING") != "1":
        raise ConfigError("fault_injection and fault_delays are test hooks; they are refused "
                          "unless BEFUND_TESTING=1")
    _check_worklist(cfg)
    try:
        check_rules(cfg.destinations, cfg.delivery_rules)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _check_network_limits(cfg)
    _import_task_modules(cfg)
    return cfg


def _import_task_modules(cfg: Config) -> None:
    """Register the tasks the config names, in this process (before any card is parsed)."""
    from pipelines.tasks import TaskError, import_task_modules

    try:
        import_task_modules(cfg.task_modules)
    except TaskError as exc:
        raise ConfigError(str(exc)) from exc


def _check_worklist(cfg: Config) -> None:
    from service.viewer_links import check_template

    try:
        check_template(cfg.viewer_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.audit_view_window_s < 0:
        raise ConfigError(f"audit_view_window_s must be 0 or more, not {cfg.audit_view_window_s}")


def _check_state(cfg: Config) -> None:
    """The state DB and the shared storage: a PostgreSQL URL or none, a usable instance name,
    and results beside a shared spool (another instance delivers what this one encoded)."""
    if cfg.database_url and not cfg.database_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("database_url must be a postgresql:// URL (or empty for SQLite under var_dir)")
    if cfg.instance_id and not INSTANCE_ID_RE.match(cfg.instance_id):
        raise ConfigError(f"instance_id {cfg.instance_id!r}: use 1-64 letters, digits, '.', '_' or "
                          "'-', starting with a letter or digit")
    if cfg.spool_dir and cfg.database_url and not cfg.results_dir:
        raise ConfigError("spool_dir is shared: set results_dir to a shared folder too (the "
                          "instance that delivers a result may not be the one that encoded it)")
    if cfg.database_pool_size < 2 or cfg.database_timeout_s <= 0 or cfg.delivery.lease_s <= 0:
        raise ConfigError("database_pool_size must be at least 2, database_timeout_s and "
                          "delivery.lease_s greater than 0")


ROLES = ("all", "receiver", "worker", "models")


def _check_scale(cfg: Config) -> None:
    """A known role, a receiver count SQLite can take, and model service URLs."""
    if cfg.role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {cfg.role!r}")
    if cfg.role in ("receiver", "worker") and not cfg.database_url:
        raise ConfigError(f"role {cfg.role} shares the work with other instances: set database_url "
                          "(PostgreSQL) and a shared spool_dir; SQLite serves role all only")
    if cfg.receive_workers < 0 or cfg.receive_workers > 256:
        raise ConfigError(f"receive_workers must be 0 (one per core) to 256, not {cfg.receive_workers}")
    if cfg.receive_workers > 1 and not cfg.database_url:
        raise ConfigError("receive_workers above 1 needs database_url (PostgreSQL): with SQLite one "
                          "process receives (its wake-ups reach only its own process)")
    for url in cfg.model_services:
        if not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._/-]*)?", url):
            raise ConfigError(f"model_services: {url!r} is not an http(s)://host:port address")
    if cfg.model_call_timeout_s <= 0:
        raise ConfigError("model_call_timeout_s must be greater than 0")


def _check_http(cfg: Config) -> None:
    """The HTTP side's keys: a token long enough, both TLS files or neither, positive limits."""
    if cfg.token and len(cfg.token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"token: {len(cfg.token)} characters is too short, use at least {MIN_TOKEN_CHARS} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), or leave it "
            "empty and the node generates one in var_dir/token")
    tls = cfg.http_tls
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("http_tls needs both cert and key (PEM files), or neither for plain HTTP")
    for name in ("cert", "key"):
        path = getattr(tls, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"http_tls.{name}: {path} is not a file")
    for name in ("http_auth_failures_per_minute", "http_session_hours", "http_max_sessions",
                 "http_max_target_bytes", "http_max_header_bytes"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0, not {getattr(cfg, name)}")


def _check_network_limits(cfg: Config) -> None:
    """Every network limit bounds something a peer controls: none may be zero (unbounded)."""
    for name in ("max_pdu", "max_associate_rq_bytes", "max_connections_per_address", "listen_backlog",
                 "association_request_timeout_s", "max_associations"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0 (0 would leave what a peer sends unbounded)")
