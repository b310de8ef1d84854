"""A model's lifecycle at the card and config level: mode (active, shadow, disabled), two active
versions refused unless one supersedes the other, `befund serve` failing fast with the message,
and per-site thresholds parsed, validated and applied (no node needed; the real node is
tests/test_shadow_and_site_thresholds.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.findings import AnalysisResult
from pipelines.model_card import CardError, load_card, usable_cards
from pipelines.model_lineup import LineupError, model_lineup
from pipelines.operating_point import at_threshold
from service.config import ConfigError, load_config
from service.site_thresholds import operating_point, parse_site_thresholds

PROJECT = Path(__file__).resolve().parent.parent
BEFUND = Path(sys.executable).parent / "befund"


def model_copy(models: Path, folder: str, **card: object) -> Path:
    """A copy of models/ich_ct under `models/folder` with `card`'s fields changed."""
    target = models / folder
    shutil.copytree(PROJECT / "models" / "ich_ct", target,
                    ignore=shutil.ignore_patterns("*.py", "*.png"))
    data = yaml.safe_load((target / "card.yaml").read_text())
    data.update(card)
    (target / "card.yaml").write_text(yaml.safe_dump(data))
    return target


@pytest.fixture
def models(tmp_path) -> Path:
    root = tmp_path / "models"
    model_copy(root, "ich_ct")
    return root


def test_a_card_is_active_unless_it_says_otherwise(models):
    card = load_card(models / "ich_ct")
    assert (card.mode, card.supersedes) == ("active", "")


@pytest.mark.parametrize("fields,message", [
    ({"mode": "paused"}, "mode: 'paused' is not one of active, shadow, disabled"),
    ({"supersedes": "0.1.0"}, "supersedes: '0.1.0' is this card's own version"),
])
def test_bad_mode_or_supersedes_is_refused_naming_the_field(models, fields, message):
    folder = model_copy(models, "bad", **fields)
    with pytest.raises(CardError) as err:
        load_card(folder)
    assert message in str(err.value) and "bad/card.yaml" in str(err.value)


def test_two_active_versions_are_refused_naming_both_folders_and_versions(models):
    model_copy(models, "ich_ct_v2", version="0.2.0")
    with pytest.raises(LineupError) as err:
        model_lineup(models)
    text = str(err.value)
    assert "2 active versions of model ich_ct" in text
    assert f"ich_ct@0.1.0 ({models / 'ich_ct'})" in text and f"ich_ct@0.2.0 ({models / 'ich_ct_v2'})" in text
    assert "mode: shadow" in text and 'supersedes: "0.1.0"' in text
    with pytest.raises(LineupError):  # the node and the model service load cards this way
        usable_cards(models)


def test_the_newer_version_supersedes_the_older_which_is_not_run(models):
    model_copy(models, "ich_ct_v2", version="0.2.0", supersedes="0.1.0")
    lineup = model_lineup(models)
    assert [c.key for c in lineup.cards] == ["ich_ct@0.2.0"]
    assert "ich_ct@0.1.0 is superseded by ich_ct@0.2.0" in lineup.retired["ich_ct"]
    assert lineup.errors == {}


def test_a_shadow_version_runs_beside_the_active_one(models):
    model_copy(models, "ich_ct_v2", version="0.2.0", mode="shadow", supersedes="0.1.0")
    lineup = model_lineup(models)
    assert sorted((c.key, c.mode) for c in lineup.cards) == [("ich_ct@0.1.0", "active"),
                                                            ("ich_ct@0.2.0", "shadow")]
    assert lineup.active("ich_ct").version == "0.1.0"  # supersedes acts only once it is active
    assert [c.version for c in lineup.shadows("ich_ct")] == ["0.2.0"]


def test_a_disabled_card_is_loaded_nowhere_not_even_its_model_file(models):
    folder = model_copy(models, "ich_ct_old", version="0.0.9", mode="disabled")
    (folder / "model.onnx").write_bytes(b"not a model")  # never read, so never refused
    lineup = model_lineup(models)
    assert [c.key for c in lineup.cards] == ["ich_ct@0.1.0"]
    assert lineup.errors == {} and "disabled" in lineup.retired["ich_ct_old"]
    assert {"ich_ct", "ich_ct@0.0.9", "ich_ct@0.1.0"} <= lineup.known_keys()


def test_three_active_versions_where_one_supersedes_another_are_still_refused(models):
    model_copy(models, "v2", version="0.2.0")
    model_copy(models, "v3", version="0.3.0", supersedes="0.1.0")
    with pytest.raises(LineupError) as err:
        model_lineup(models)
    assert "ich_ct@0.2.0" in str(err.value) and "ich_ct@0.3.0" in str(err.value)


def serve(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "befund.yaml"
    path.write_text(yaml.safe_dump({"var_dir": str(tmp_path / "var"), "http_port": 1,
                                    "dicom_port": 1, **config}))
    return subprocess.run([str(BEFUND), "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def test_befund_serve_fails_fast_on_two_active_versions(tmp_path, models):
    model_copy(models, "ich_ct_v2", version="0.2.0")
    proc = serve(tmp_path, {"models_dir": str(models)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "2 active versions of model ich_ct" in proc.stderr
    assert str(models / "ich_ct_v2") in proc.stderr and "ich_ct@0.1.0" in proc.stderr


def test_befund_serve_refuses_site_thresholds_for_a_model_it_does_not_have(tmp_path, models):
    proc = serve(tmp_path, {"models_dir": str(models),
                            "site_thresholds": {"ich_cta": {"calling_ae": {"CT1": 0.4}}}})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "site_thresholds: ich_cta names no model" in proc.stderr


# --- per-site thresholds -------------------------------------------------------------------


def config_with(tmp_path: Path, site_thresholds: object):
    path = tmp_path / "befund.yaml"
    path.write_text(yaml.safe_dump({"site_thresholds": site_thresholds}))
    return load_config(path, env={})


@pytest.mark.parametrize("value,message", [
    ({"ich_ct": {"calling_ae": {"CT1": 0.4}, "modality": {"CT": 0.3}}},
     "unknown key(s) in site_thresholds.ich_ct: modality; known: calling_ae, institution"),
    ({"ich_ct": {"calling_ae": {"CT1": 1.2}}}, "site_thresholds.ich_ct.calling_ae.CT1: 1.2 must lie"),
    ({"ich_ct": {"calling_ae": {"CT1": "low"}}}, "'low' is not a threshold"),
    ({"ich_ct": {"calling_ae": {"A" * 17: 0.4}}}, "is not an AE title"),
    ({"ich_ct": {"institution": {"x" * 65: 0.4}}}, "is not an institution name"),
    ({"ich_ct": {"calling_ae": [0.4]}}, "site_thresholds.ich_ct.calling_ae: must map each site"),
    ({"ich ct": {"calling_ae": {"CT1": 0.4}}}, "'ich ct' is not a model name"),
    ([0.4], "site_thresholds must map model names"),
])
def test_bad_site_thresholds_are_refused_naming_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError) as err:
        config_with(tmp_path, value)
    assert message in str(err.value)


def test_site_thresholds_pick_institution_then_calling_ae_then_the_card(tmp_path):
    rules = config_with(tmp_path, {
        "ich_ct": {"calling_ae": {"CT_NORTH": 0.4, "PACS": 0.6},
                   "institution": {"Klinikum  Sued": 0.7}},
        "ich_ct@0.2.0": {"calling_ae": {"CT_NORTH": 0.45}},
    }).site_thresholds

    def point(version, ae, institution=""):
        p = operating_point(rules, "ich_ct", version, 0.5, ae, institution)
        return p.threshold, p.source

    assert point("0.1.0", "CT_NORTH") == (0.4, "calling AE CT_NORTH")
    assert point("0.2.0", "CT_NORTH") == (0.45, "calling AE CT_NORTH")  # the version's own entry
    assert point("0.1.0", "PACS", "klinikum sued") == (0.7, "institution klinikum sued")
    assert point("0.1.0", "PACS", "Elsewhere") == (0.6, "calling AE PACS")
    assert point("0.1.0", "CT_SOUTH") == (0.5, "card")
    assert operating_point(rules, "tumor_wsi", "1", 0.3, "CT_NORTH", "").source == "card"


def test_a_site_threshold_moves_the_verdict_not_the_score_or_its_probability():
    card = load_card(PROJECT / "models" / "ich_ct", verify=False)
    scores = (0.1, 0.42, 0.45, 0.2)
    result = AnalysisResult.verdict(0.45, 0.5, card.calibration.probability(0.45, 0.5),
                                    scores=scores, measurements={"slices_above_threshold": 0.0})
    assert result.present is False
    lowered = at_threshold(result, card, 0.4, "calling AE CT_NORTH")
    assert lowered.present is True and lowered.score == result.score and lowered.threshold == 0.4
    assert lowered.certainty == pytest.approx(1.0 - result.certainty)  # same probability, other side
    assert lowered.measurements["slices_above_threshold"] == 2.0
    assert lowered.threshold_source == "calling AE CT_NORTH"
    assert AnalysisResult.from_dict(lowered.to_dict()) == lowered
    not_analysed = AnalysisResult.not_analysed("3 slices")
    assert at_threshold(not_analysed, card, 0.4, "calling AE CT_NORTH") is not_analysed


def test_the_config_keeps_site_thresholds_apart_from_the_environment(tmp_path):
    cfg = config_with(tmp_path, {"ich_ct": {"institution": {"Klinikum Nord": 0.45}}})
    assert parse_site_thresholds(None) == ()
    [rule] = cfg.site_thresholds
    assert rule.model == "ich_ct" and rule.institution == (("klinikum nord", 0.45),)


def test_shadow_jobs_queue_behind_every_active_job(models):
    from dataclasses import replace

    from service.routing import job_priority

    active = load_card(models / "ich_ct")
    low = replace(active, postprocessing=replace(active.postprocessing, priority_when_positive="low"))
    shadow = replace(active, version="0.2.0", mode="shadow")
    assert job_priority(shadow) < job_priority(low) < job_priority(active)


def test_a_shadow_job_runs_only_while_no_active_job_runs_or_waits(state_db_target):
    """On a few cores a shadow run beside an active one slows the delivered result down."""
    import time

    from service.state_db import StateDB
    from tests.test_completion_routing import instance

    db = StateDB(state_db_target)
    try:
        def series(k):
            uid = f"1.2.826.0.8.{k}.1"
            db.record_instance(instance(series=uid, sop=f"{uid}.1", study_uid=f"1.2.826.0.8.{k}"))
            db.mark_series(uid, "routed")  # complete: no more instances to wait for
            return db.series(uid)

        first, second = series(1), series(2)
        db.create_job_if_new(first, "ich_ct", "0.2.0", -90, time.time(), mode="shadow")
        active = db.create_job_if_new(first, "ich_ct", "0.1.0", 10, time.time())
        assert db.lease_job("w1", 60).id == active
        assert db.lease_job("w2", 60) is None  # the shadow job waits for the active one
        assert db.next_job_at() is not None and db.next_job_at() > time.time() + 30  # no busy loop
        db.finish_job(active, "done", {"present": False, "score": 0.1}, "", [])
        shadow = db.lease_job("w1", 60)
        assert shadow is not None and shadow.shadow
        db.create_job_if_new(second, "ich_ct", "0.2.0", -90, time.time(), mode="shadow")
        assert db.lease_job("w2", 60) is None  # one shadow job at a time
        later = db.create_job_if_new(second, "ich_ct", "0.1.0", 10, time.time())
        assert db.lease_job("w2", 60).id == later  # an active job never waits for a shadow one
    finally:
        db.close()


def test_a_shadow_job_waits_while_a_series_is_still_arriving(tmp_path):
    import time

    from service.state_db import StateDB
    from tests.test_completion_routing import instance

    db = StateDB(tmp_path / "state.sqlite")
    try:
        uid = "1.2.826.0.8.1.1"
        db.record_instance(instance(series=uid, sop=f"{uid}.1", study_uid="1.2.826.0.8.1"))
        series = db.series(uid)
        db.mark_series(uid, "routed")
        db.create_job_if_new(series, "ich_ct", "0.2.0", -90, time.time(), mode="shadow")
        db.record_instance(instance(series="1.2.826.0.8.2.1", sop="1.2.826.0.8.2.1.1",
                                    study_uid="1.2.826.0.8.2"))  # the next study is arriving
        assert db.lease_job("w1", 60) is None
        db.mark_series("1.2.826.0.8.2.1", "no_model")
        assert db.lease_job("w1", 60).shadow
    finally:
        db.close()
