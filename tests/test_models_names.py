from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.models.names import (
    InvalidModelName,
    ModelName,
    folder_in_store,
    name_from_folder,
    parse_name,
)

ROOT = Path("/srv/models")


@pytest.mark.parametrize(
    ("text", "display", "full"),
    [
        ("llama3.2", "llama3.2:latest", "registry.ollama.ai/library/llama3.2:latest"),
        ("qwen2.5:1.5b", "qwen2.5:1.5b", "registry.ollama.ai/library/qwen2.5:1.5b"),
        ("library/qwen2.5:1.5b", "qwen2.5:1.5b", "registry.ollama.ai/library/qwen2.5:1.5b"),
        ("user/m:tag", "user/m:tag", "registry.ollama.ai/user/m:tag"),
        ("example.com:5000/user/m", "example.com:5000/user/m:latest", "example.com:5000/user/m:latest"),
        ("_x", "_x:latest", "registry.ollama.ai/library/_x:latest"),
        ("deepseek-1.5b", "deepseek-1.5b:latest", "registry.ollama.ai/library/deepseek-1.5b:latest"),
    ],
)
def test_parse_display_and_full(text: str, display: str, full: str) -> None:
    name = parse_name(text)
    assert name.display == display
    assert name.full == full
    assert str(name) == display


def test_key_is_case_insensitive() -> None:
    assert parse_name("Llama3.2").key == parse_name("llama3.2:LATEST").key
    assert parse_name("User/M:Tag").key == parse_name("user/m:tag").key
    assert parse_name("a:b").key != parse_name("a:c").key


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        "m:",
        ":tag",
        "-model",
        ".model",
        "../x",
        "a/../../b",
        "/abs/path",
        "a/b/c/d",
        "a//b",
        "ns.dot/m",  # no dot in a namespace
        "mo del",
        "m\x00",
        "m:t:t",
        "ｍodel",  # fullwidth m
        "a／b",  # fullwidth solidus
        "a∕b",  # division slash
        "m" * 81,
        "m:" + "t" * 81,
        "x+y",
        "m@sha256",
    ],
)
def test_invalid_names(text: str) -> None:
    with pytest.raises(InvalidModelName, match="invalid model name"):
        parse_name(text)


def test_long_but_valid_parts() -> None:
    name = parse_name("n" * 80 + "/" + "m" * 80 + ":" + "t" * 80)
    assert name.model == "m" * 80


@pytest.mark.parametrize(
    ("folder", "display"),
    [
        ("deepseek-1.5b", "deepseek-1.5b:latest"),
        ("qwen2.5:1.5b", "qwen2.5:1.5b"),
        ("x:latest", "x:latest"),
        ("my_model.v2", "my_model.v2:latest"),
        ("user+m:t", "user/m:t"),
        ("example.com:5000+user+m", "example.com:5000/user/m:latest"),
    ],
)
def test_seed_and_scheme_folders(folder: str, display: str) -> None:
    assert name_from_folder(folder).display == display


@pytest.mark.parametrize("folder", [".staging-123", "My Model", "a+b+c+d", "..", ".", "", "a/b", "-x"])
def test_non_model_folders(folder: str) -> None:
    with pytest.raises(InvalidModelName):
        name_from_folder(folder)


def test_folder_names() -> None:
    assert parse_name("deepseek-1.5b").folder_name == "deepseek-1.5b"
    assert parse_name("qwen2.5:1.5b").folder_name == "qwen2.5:1.5b"
    assert parse_name("user/m:t").folder_name == "user+m:t"
    assert folder_in_store(ROOT, parse_name("user/m:t")) == ROOT / "user+m:t"


def _inside_store(text: str) -> None:
    try:
        name = parse_name(text)
    except InvalidModelName:
        return
    folder = folder_in_store(ROOT, name)
    assert folder.parent == ROOT
    assert folder.name not in ("", ".", "..")
    assert not folder.name.startswith(".")
    assert (ROOT / name.folder_name).resolve().parent == ROOT.resolve()
    assert name_from_folder(folder.name).key == name.key


@given(st.text(max_size=200))
def test_any_text_is_invalid_or_inside_store(text: str) -> None:
    _inside_store(text)


@given(st.text(alphabet="abAB01_.-:/+\\\x00 ~", max_size=40))
def test_name_like_text_is_invalid_or_inside_store(text: str) -> None:
    _inside_store(text)


_first = st.sampled_from("abcXYZ019_")
_rest = st.text(alphabet="abcXYZ019_-.", max_size=20)
_part = st.builds(lambda a, b: a + b, _first, _rest)
_namespace = st.builds(lambda a, b: a + b, _first, st.text(alphabet="abcXYZ019_-", max_size=20))
_host = st.builds(lambda a, b: a + b, _first, st.text(alphabet="abc019_-.:", max_size=30))


@given(_part, _part, st.one_of(st.none(), _namespace), st.one_of(st.none(), _host))
def test_round_trip_display_folder_name(
    model: str, tag: str, namespace: str | None, host: str | None
) -> None:
    text = f"{model}:{tag}"
    if namespace is not None:
        text = f"{namespace}/{text}"
        if host is not None:
            text = f"{host}/{text}"
    name = parse_name(text)
    assert parse_name(name.display).key == name.key
    back = name_from_folder(name.folder_name)
    assert back.key == name.key
    assert back.display.lower() == name.display.lower()
    assert isinstance(back, ModelName)
