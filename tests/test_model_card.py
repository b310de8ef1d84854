"""Model cards are checked when loaded, with errors that name the card and the field."""

import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.model_card import CardError, load_card, usable_cards

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ich(tmp_path):
    folder = tmp_path / "models" / "ich_ct"
    shutil.copytree(PROJECT / "models" / "ich_ct", folder, ignore=shutil.ignore_patterns("train.py"))
    return folder


def edit(folder, change):
    data = yaml.safe_load((folder / "card.yaml").read_text())
    change(data)
    (folder / "card.yaml").write_text(yaml.safe_dump(data))


def test_reference_card_loads_and_says_it_is_trained_on_phantoms(ich):
    card = load_card(ich)
    assert card.key.startswith("ich_ct@")
    assert "phantom" in card.intended_use.lower() and "not for clinical use" in card.intended_use.lower()
    for figure in ("sensitivity", "specificity", "auc"):
        assert 0.0 <= float(card.validation[figure]) <= 1.0


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("intended_use"), "intended_use: required field is missing"),
    (lambda d: d["input"].update(shape=[1, 9, 128, 128]), "batch"),
    (lambda d: d["input"].update(shape=[-1, 3, 128, 128]), "expected [-1, 9, 128, 128]"),
    (lambda d: d["postprocessing"].update(threshold=1.5), "threshold"),
    (lambda d: d["postprocessing"].update(aggregation="median"), "aggregation"),
    (lambda d: d.update(task="audio"), "task"),
    (lambda d: d.update(sha256="0" * 64), "sha256 of model.onnx"),
    # a misspelt key would leave the model on a default (here: active instead of shadow)
    (lambda d: d.update(mdoe="shadow"), "unknown key(s): mdoe (known in the card: "),
    (lambda d: d["postprocessing"].update(treshold=0.2), "unknown key(s): postprocessing.treshold"),
])
def test_bad_card_is_refused_naming_the_field(ich, change, message):
    edit(ich, change)
    with pytest.raises(CardError) as err:
        load_card(ich)
    assert message in str(err.value) and "card.yaml" in str(err.value)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["validated_domain"].update(slice_thickness_mm=[5, 2.5]),
     "validated_domain.slice_thickness_mm: [5, 2.5] is not a range"),
    (lambda d: d["validated_domain"].update(kvp="120"), "validated_domain.kvp: '120' is not a list"),
    (lambda d: d["validated_domain"].update(slice_spacing=[1, 5]),
     "validated_domain.slice_spacing: unknown field"),
    (lambda d: d["validated_domain"].update(convolution_kernel_families=["medium"]),
     "validated_domain.convolution_kernel_families: 'medium' is not one of soft, sharp"),
    (lambda d: d["validated_domain"].update(contrast="no"),
     "validated_domain.contrast: 'no' is not true or false"),
    (lambda d: d["validated_domain"].pop("never_validated_on"),
     "validated_domain.never_validated_on: required field is missing"),
    (lambda d: d["validated_domain"].update(never_validated_on=[{"real scans": "never"}]),
     "validated_domain.never_validated_on: give one line of text per item"),
    (lambda d: d["validated_domain"]["ood"].update(features="penultimate"),
     "validated_domain.ood.features: 'penultimate' is not one of"),
    (lambda d: d["validated_domain"]["ood"].update(names=["a", "b"]), "validated_domain.ood.names"),
    (lambda d: d["validated_domain"]["ood"].update(mean=[0.0]), "validated_domain.ood.mean: 1 values for 6"),
    (lambda d: d["validated_domain"]["ood"].update(precision=[[-1.0 if i == j else 0.0 for j in range(6)]
                                                              for i in range(6)]),
     "validated_domain.ood.precision: must be positive definite"),
    (lambda d: d["validated_domain"]["ood"].update(threshold=0),
     "validated_domain.ood.threshold: 0.0 must be"),
    (lambda d: d["calibration"].update(method="isotonic"), "calibration.method: 'isotonic' is not one of"),
    (lambda d: d["calibration"].update(temperature=-1), "calibration.temperature: -1.0 must be a positive"),
    (lambda d: d["calibration"].update(max_certainty=1.0), "calibration.max_certainty: 1.0 must lie"),
])
def test_bad_domain_or_calibration_is_refused_naming_the_field(ich, change, message):
    edit(ich, change)
    with pytest.raises(CardError) as err:
        load_card(ich)
    assert message in str(err.value) and "card.yaml" in str(err.value)


def test_one_broken_model_does_not_stop_the_others(ich):
    broken = ich.parent / "broken"
    shutil.copytree(ich, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    cards, errors = usable_cards(ich.parent)
    assert [c.name for c in cards] == ["ich_ct"]
    assert "sha256" in errors["broken"]
