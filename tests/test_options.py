"""Request `options`: validation against the one option table, and layering over the Modelfile."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.options import KNOWN_OPTIONS, OptionError, layer_options, sampling_from, validate_options


def test_removed_and_unknown_keys_are_ignored_whatever_their_type() -> None:
    raw = {"numa": "yes", "low_vram": 3, "mirostat": 2, "tfs_z": "x", "new_topic_penalty": None, "top_k": 5}
    assert validate_options(raw) == {"top_k": 5}


def test_stop_may_be_a_string_and_empty_stops_are_dropped() -> None:
    assert validate_options({"stop": "END"}) == {"stop": ["END"]}
    assert validate_options({"stop": ["a", "", "b"]}) == {"stop": ["a", "b"]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"temperature": "hot"}, 'option "temperature" must be of type number'),
        ({"num_predict": True}, 'option "num_predict" must be of type integer'),
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
        ({"stop": [1]}, 'option "stop" must be of type array'),
        ("not an object", '"options" must be an object'),
    ],
)
def test_wrong_types_name_the_option(raw: object, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        validate_options(raw)


def test_ints_accept_any_number_and_truncate() -> None:
    assert validate_options({"num_ctx": 2048.9, "seed": 7}) == {"num_ctx": 2048, "seed": 7}


def test_request_options_override_the_modelfile() -> None:
    merged = layer_options({"temperature": 0.2, "top_k": 10, "stop": ["x"]}, {"temperature": 0.9})
    assert merged == {"temperature": 0.9, "top_k": 10, "stop": ["x"]}
    sampling = sampling_from(merged)
    assert sampling.temperature == 0.9 and sampling.top_k == 10


@given(
    st.dictionaries(st.text(max_size=12), st.none() | st.booleans() | st.integers() | st.floats() | st.text())
)
def test_validation_keeps_only_known_keys_or_names_the_bad_one(raw: dict[str, object]) -> None:
    try:
        result = validate_options(raw)
    except OptionError as exc:
        assert any(f'"{key}"' in str(exc) for key in raw if key in KNOWN_OPTIONS)
    else:
        assert set(result) <= KNOWN_OPTIONS
