"""The config: defaults, YAML, environment overrides, and clear errors for typos."""

import pytest

from service.config import ConfigError, Destination, load_config


def test_defaults_match_the_readme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={})
    assert (cfg.ae_title, cfg.dicom_port, cfg.http_port) == ("BEFUND", 11112, 3000)
    assert cfg.db_path.name == "state.sqlite" and cfg.var_dir == "var"
    assert cfg.is_allowed("ANYONE", "127.0.0.1")
    assert not cfg.is_allowed("ANYONE", "10.1.2.3")


def test_yaml_then_environment(tmp_path):
    path = tmp_path / "befund.yaml"
    path.write_text("ae_title: NODE1\nsettle_s: 5\nallow: ['CT1@10.0.0.0/8']\n"
                    "delivery: {max_backoff_s: 9}\n")
    cfg = load_config(path, env={"BEFUND_PACS": "PACS@10.0.0.5:104", "BEFUND_VAR": "/x/var",
                                 "BEFUND_SETTLE_S": "0.5"})
    assert cfg.ae_title == "NODE1" and cfg.settle_s == 0.5 and cfg.var_dir == "/x/var"
    assert cfg.destinations == (Destination("PACS", "10.0.0.5", 104),)
    assert cfg.delivery.max_backoff_s == 9
    assert cfg.is_allowed("CT1", "10.9.9.9") and not cfg.is_allowed("CT2", "10.9.9.9")
    assert not cfg.is_allowed("CT1", "127.0.0.1")


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "befund.yaml"
    path.write_text("settle_seconds: 3\n")
    with pytest.raises(ConfigError, match="settle_seconds"):
        load_config(path, env={})


@pytest.mark.parametrize("text", ["PACS@host", "@h:1", "TOO-LONG-AE-TITLE-X@h:1", "A@h:port"])
def test_bad_destination_is_refused(text):
    with pytest.raises(ConfigError, match="AE@host:port"):
        Destination.parse(text)


def test_bad_network_in_allow_list(tmp_path):
    path = tmp_path / "befund.yaml"
    path.write_text("allow: [{ae_title: X, network: 'not-a-net'}]\n")
    with pytest.raises(ConfigError, match="CIDR"):
        load_config(path, env={})


def test_scale_keys_receivers_roles_and_model_services(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pg = {"BEFUND_DATABASE_URL": "postgresql://befund@db/befund"}
    assert load_config(env={}).receiver_processes == 1  # SQLite: one process receives
    cfg = load_config(env={**pg, "BEFUND_ROLE": "worker",
                           "BEFUND_MODEL_SERVICES": "http://gpu1:3000, http://gpu2:3000/"})
    assert cfg.role == "worker" and cfg.model_services == ("http://gpu1:3000", "http://gpu2:3000")
    assert cfg.receiver_processes >= 1  # PostgreSQL: one per usable core
    assert load_config(env={**pg, "BEFUND_RECEIVE_WORKERS": "3"}).receiver_processes == 3
    with pytest.raises(ConfigError, match="receive_workers above 1 needs database_url"):
        load_config(env={"BEFUND_RECEIVE_WORKERS": "2"})
    with pytest.raises(ConfigError, match="role receiver shares the work"):
        load_config(env={"BEFUND_ROLE": "receiver"})
    with pytest.raises(ConfigError, match="role must be one of"):
        load_config(env={"BEFUND_ROLE": "gateway"})
    with pytest.raises(ConfigError, match="is not an http"):
        load_config(env={"BEFUND_MODEL_SERVICES": "file:///etc/passwd"})
