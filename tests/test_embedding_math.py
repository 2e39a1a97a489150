"""Embedding post-processing shared by /api/embed, /api/embeddings and /v1/embeddings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.generation import finite_vectors, l2_normalised
from rkllama_ollama.runtime.base import RuntimeFailure


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_infinite_vectors_are_refused(bad: float) -> None:
    with pytest.raises(RuntimeFailure, match="NaN or infinite"):
        finite_vectors([[0.1, 0.2], [0.3, bad]])
    assert finite_vectors([[0.1, 0.2]]) == [[0.1, 0.2]]


@given(
    st.lists(st.floats(-1e6, 1e6).map(lambda x: round(x, 6)), min_size=1, max_size=64),
    st.none() | st.integers(1, 64),
)
def test_l2_normalised_is_unit_length_or_zero(vector: list[float], dimensions: int | None) -> None:
    out = l2_normalised(vector, dimensions)
    assert len(out) == len(vector[:dimensions] if dimensions else vector)
    norm = math.sqrt(sum(v * v for v in out))
    assert math.isclose(norm, 1.0, rel_tol=1e-9) or all(v == 0.0 for v in out)
