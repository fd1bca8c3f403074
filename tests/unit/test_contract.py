import pytest

from contract.model import ContractError, parse_metadata
from contract.text import preprocess


def test_d2l_rule_collapses_non_letters_and_lowercases():
    assert (
        preprocess("The Time-Traveller,  (for so\nit will be")
        == "the time traveller for so it will be"
    )


def test_unknown_rule_is_rejected():
    with pytest.raises(ContractError, match="unknown preprocess rule"):
        preprocess("x", "nope")


def test_metadata_missing_config_named():
    with pytest.raises(ContractError, match=r"lstm_serve\.config"):
        parse_metadata({"lstm_serve.vocab": '["a","b"]'})
