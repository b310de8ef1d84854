"""deploy/: the Docker Compose file and the Kubernetes manifests agree with the code.

No Docker or cluster needed: the files are parsed, and every container's command must parse
with `befund`'s own CLI and name a role, every BEFUND_* variable must be a config key the node
reads (service/config.py), the environment must load as a valid config for that role, ports
and probes must match the config's ports, and the spool must be one shared volume.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from service.config import ROLES, _env_overrides, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
READ_ELSEWHERE = {"BEFUND_LOG_LEVEL", "BEFUND_CONFIG", "BEFUND_TESTING"}  # not config keys
# values a cluster fills in (Secrets, the pod's name)
PLACEHOLDERS = {"BEFUND_DATABASE_URL": "postgresql://befund@db.example/befund",
                "BEFUND_TOKEN": "x" * 40, "BEFUND_INSTANCE_ID": "befund-receiver-0"}


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def config_map() -> dict[str, str]:
    [cm] = [d for d in k8s_docs() if d["kind"] == "ConfigMap"]
    return cm["data"]


def k8s_containers() -> list[tuple[dict, dict, dict]]:
    """(workload, pod spec, container) of every Deployment and StatefulSet."""
    out = []
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            out += [(doc, pod, c) for c in pod["containers"]]
    return out


def k8s_env(container: dict) -> dict[str, str]:
    env = dict(config_map()) if any("configMapRef" in e for e in container.get("envFrom", [])) else {}
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", PLACEHOLDERS.get(item["name"], ""))
    return env


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_env(service: dict) -> dict[str, str]:
    return {k: PLACEHOLDERS.get(k) or re.sub(r"\$\{[^}]*\}", "", str(v))
            for k, v in service["environment"].items()}


def every_container() -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, environment) of every container in both files."""
    out = [(f"k8s {w['metadata']['name']}", c["command"], k8s_env(c)) for w, _, c in k8s_containers()]
    out += [(f"compose {name}", s["command"], compose_env(s)) for name, s in compose()["services"].items()]
    return out


def role_of(command: list[str]) -> str:
    assert command[:3] == ["python", "-m", "service.cli"], command
    args = build_parser().parse_args(command[3:])
    assert args.command == "serve"
    return args.role


@pytest.mark.parametrize("name,command,env", every_container(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_container_runs_a_role_with_a_config_the_node_accepts(name, command, env):
    role = role_of(command)
    assert role in ROLES
    for key in env:
        assert key.startswith("BEFUND_"), f"{name}: {key}"
        assert key in READ_ELSEWHERE or _env_overrides({key: "1"}), f"{name}: {key} is no config key"
    config = load_config(path=None, env={**env, "BEFUND_ROLE": role, "BEFUND_CONFIG": "/dev/null"})
    assert config.role == role
    if role in ("receiver", "worker"):
        assert config.database_url.startswith("postgresql://"), name
        assert config.spool_dir and config.results_dir, f"{name}: the spool must be shared"
    if role == "worker":
        assert config.model_services, f"{name}: a worker without a model service beside it needs URLs"


def test_every_role_is_deployed_in_both_files():
    k8s = {role_of(c["command"]) for _, _, c in k8s_containers()}
    dc = {role_of(s["command"]) for s in compose()["services"].values()}
    assert k8s == dc == {"receiver", "worker", "models"}


def test_kubernetes_ports_probes_gpu_and_shared_spool_match_the_config():
    services = [d for d in k8s_docs() if d["kind"] == "Service"]
    [pvc] = [d for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload, pod, container in k8s_containers():
        role = role_of(container["command"])
        config = load_config(path=None, env={**k8s_env(container), "BEFUND_CONFIG": "/dev/null"})
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == config.http_port
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        if role == "receiver":
            assert ports["dicom"] == config.dicom_port
            [dicom] = [s for s in services if any(p["name"] == "dicom" for p in s["spec"]["ports"])]
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert dicom["spec"]["selector"].items() <= labels.items()
            assert dicom["spec"]["ports"][0]["protocol"] == "TCP"
        if role == "models":
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
            assert config.inference_provider == "cuda"
            # each replica's stable address is one of the workers' model_services
            name = workload["metadata"]["name"]
            shared = {**PLACEHOLDERS, **config_map(), "BEFUND_CONFIG": "/dev/null"}
            urls = load_config(path=None, env=shared).model_services
            assert [f"http://{name}-{i}.{workload['spec']['serviceName']}:{config.http_port}"
                    for i in range(workload["spec"]["replicas"])] == list(urls)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        [spool] = [n for n, claim in claims.items() if claim == pvc["metadata"]["name"]]
        assert Path(config.spool_path).is_relative_to(mounts[spool])
        assert Path(config.results_path).is_relative_to(mounts[spool])


def test_compose_ports_match_the_config():
    services = compose()["services"]
    for name, service in services.items():
        env = {**compose_env(service), "BEFUND_ROLE": role_of(service["command"]),
               "BEFUND_CONFIG": "/dev/null"}
        config = load_config(path=None, env=env)
        inside = {int(p.split(":")[1]) for p in service.get("ports", [])}
        if config.role == "receiver":
            assert {config.dicom_port, config.http_port} <= inside
        assert "/readyz" in " ".join(service["healthcheck"]["test"]) and f":{config.http_port}/" in " ".join(
            service["healthcheck"]["test"])
        assert any(v.startswith("spool:") and Path(config.spool_path).is_relative_to(v.split(":")[1])
                   for v in service["volumes"]), name
    assert "gpu" in str(services["models"]["deploy"]["resources"]["reservations"]["devices"])
    worker = load_config(path=None, env={**compose_env(services["worker"]), "BEFUND_CONFIG": "/dev/null"})
    assert worker.model_services == ("http://models:3000",)
