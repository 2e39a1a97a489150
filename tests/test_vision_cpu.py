"""GGUF vision on the CPU: the tiny llama model with a tiny random LLaVA-style projector (both written
with the `gguf` package at test time), served through llama.cpp's multimodal library.

The store tests need no engine. The daemon tests need a llama-cpp-python built with libmtmd (`make
install` builds it so); they are skipped, saying so, where the library is absent."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
from PIL import Image

from rkllama_ollama.models.store import Store
from tests.support.daemon import Daemon
from tests.support.tiny_gguf import MMPROJ_IMAGE_SIZE, MMPROJ_TOKENS, write_tiny_gguf, write_tiny_mmproj

PROJECTOR_LOADED = "projector loaded:"
PICTURE_ENCODED = "picture encoded:"
ATTENTION = 0.5  # the tiny model's attention strength: pictures must sway its answer
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 12}


def _libmtmd() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    found = sorted((Path(spec.origin).parent / "lib").glob("libmtmd.*"))
    return found[0] if found else None


needs_mtmd = pytest.mark.skipif(
    _libmtmd() is None,
    reason="llama-cpp-python was built without its multimodal library (libmtmd); `make install` builds it",
)


def noise_png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def add_vision_model(
    store: Path, name: str, modelfile: str | None = None, projector: str = "mmproj-tiny.gguf"
) -> Path:
    folder = store / name
    folder.mkdir(parents=True)
    write_tiny_gguf(folder / "tiny.gguf", context_length=512, attention=ATTENTION)
    write_tiny_mmproj(folder / projector)
    if modelfile is not None:
        (folder / "Modelfile").write_text(modelfile)
    return folder


# -- the store (no engine needed) ------------------------------------------------------------


def test_the_store_finds_a_projector_beside_the_weights(tmp_path: Path) -> None:
    store_dir = tmp_path / "models"
    add_vision_model(store_dir, "beside")
    add_vision_model(store_dir, "ollama-form", "FROM tiny.gguf\nFROM proj.gguf\n", projector="proj.gguf")
    add_vision_model(
        store_dir, "seed-form", 'FROM="tiny.gguf"\nVISION_ENCODER="p.gguf"\n', projector="p.gguf"
    )
    text = store_dir / "text"
    text.mkdir()
    write_tiny_gguf(text / "tiny.gguf")
    store = Store(store_dir)
    for name, projector in (
        ("beside", "mmproj-tiny.gguf"),
        ("ollama-form", "proj.gguf"),
        ("seed-form", "p.gguf"),
    ):
        entry = store.resolve(name)
        assert entry.weights.name == "tiny.gguf"
        assert entry.vision_encoder is not None and entry.vision_encoder.name == projector
        assert "vision" in entry.capabilities
        assert entry.vision_settings()["encoder"] == str(entry.vision_encoder)
    plain = store.resolve("text")
    assert plain.vision_encoder is None and "vision" not in plain.capabilities


@needs_mtmd
def test_the_projector_names_its_input_size_and_a_picture_counts_as_its_tokens(tmp_path: Path) -> None:
    from rkllama_ollama.runtime.base import PICTURE_CELL, Engine, LoadSpec
    from rkllama_ollama.runtime.llamacpp_vision import LlamaCppVisionSession, projector_image_size

    folder = add_vision_model(tmp_path, "tiny-vl")
    assert projector_image_size(str(folder / "mmproj-tiny.gguf")) == MMPROJ_IMAGE_SIZE
    assert projector_image_size(str(folder / "tiny.gguf")) is None  # a model, not a projector
    assert projector_image_size(str(tmp_path / "missing.gguf")) is None
    vision = {"encoder": str(folder / "mmproj-tiny.gguf")}
    spec = LoadSpec(engine=Engine.LLAMACPP, model_path=str(folder / "tiny.gguf"), num_ctx=512, vision=vision)
    session = LlamaCppVisionSession(spec)
    try:
        tokens = session.tokenize("Compare <image><image>please.")
        # 32x32 pixels in 8x8 patches: 16 tokens per picture, in the tags' places.
        start = tokens.index(PICTURE_CELL)
        assert tokens[:start] == session.tokenize("Compare ")
        assert tokens[start : start + 2 * MMPROJ_TOKENS] == [PICTURE_CELL] * (2 * MMPROJ_TOKENS)
        assert PICTURE_CELL not in tokens[start + 2 * MMPROJ_TOKENS :]
        assert PICTURE_CELL not in session.tokenize("Compare please.")
    finally:
        session.close()


# -- the daemon --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if _libmtmd() is None:
        pytest.skip("llama-cpp-python was built without its multimodal library (libmtmd)")
    store = tmp_path_factory.mktemp("vision-cpu") / "models"
    add_vision_model(store, "tiny-vl")
    add_vision_model(store, "tiny-vl2", "FROM tiny.gguf\nFROM proj.gguf\n", projector="proj.gguf")
    (store / "text").mkdir()
    write_tiny_gguf(store / "text" / "tiny.gguf")
    misfit = add_vision_model(store, "misfit")  # a projector into another width than the model's
    write_tiny_mmproj(misfit / "mmproj-tiny.gguf", n_embd=32)
    with Daemon(store).start() as server:
        yield server


def _chat(daemon: Daemon, model: str, messages: list[dict[str, object]], **extra: object) -> httpx.Response:
    body = {"model": model, "messages": messages, "stream": False, "options": GREEDY, **extra}
    return httpx.post(f"{daemon.url}/api/chat", json=body, timeout=120)


def _answer(daemon: Daemon, picture: bytes, text: str = "What is in the picture?") -> str:
    response = _chat(daemon, "tiny-vl", [{"role": "user", "content": text, "images": [b64(picture)]}])
    assert response.status_code == 200, response.text
    return str(response.json()["message"]["content"])


@needs_mtmd
def test_the_answer_follows_the_picture_through_api_chat(daemon: Daemon) -> None:
    first, again = _answer(daemon, noise_png(1)), _answer(daemon, noise_png(1))
    other = _answer(daemon, noise_png(2))
    assert first == again  # greedy and deterministic for one picture...
    assert first != other  # ...and the picture reached the model: another one changes the answer
    text_only = _chat(daemon, "tiny-vl", [{"role": "user", "content": "What is in the picture?"}])
    assert text_only.status_code == 200


@needs_mtmd
def test_generate_and_openai_image_url_take_pictures(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    one = client.generate("tiny-vl", prompt="Describe it.", images=[noise_png(3)], options=GREEDY).response
    two = client.generate("tiny-vl", prompt="Describe it.", images=[noise_png(4)], options=GREEDY).response
    assert one and two and one != two
    streamed = "".join(
        part.response
        for part in client.generate(
            "tiny-vl", prompt="Describe it.", images=[noise_png(3)], options=GREEDY, stream=True
        )
    )
    assert streamed == one
    chat = ollama.Client(host=daemon.url).chat(
        "tiny-vl",
        messages=[{"role": "user", "content": "Describe it.", "images": [noise_png(3)]}],
        options=GREEDY,
    )
    url = "data:image/png;base64," + b64(noise_png(3))
    openai_client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
    completion = openai_client.chat.completions.create(
        model="tiny-vl",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe it."},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        temperature=0,
        seed=1,
        max_tokens=12,
    )
    assert completion.choices[0].message.content == chat.message.content


@needs_mtmd
def test_two_pictures_in_order_and_the_ollama_projector_form(daemon: Daemon) -> None:
    def ask(model: str, pictures: list[bytes]) -> str:
        images = [b64(p) for p in pictures]
        response = _chat(daemon, model, [{"role": "user", "content": "Compare them.", "images": images}])
        assert response.status_code == 200, response.text
        return str(response.json()["message"]["content"])

    forward = ask("tiny-vl", [noise_png(5), noise_png(6)])
    assert forward != ask("tiny-vl", [noise_png(6), noise_png(5)])
    # The same weights and projector, found through a second FROM: the same answer.
    assert ask("tiny-vl2", [noise_png(5), noise_png(6)]) == forward


@needs_mtmd
def test_the_projector_stays_resident(daemon: Daemon) -> None:
    _answer(daemon, noise_png(7))
    loaded = daemon.log().count(PROJECTOR_LOADED)
    encoded = daemon.log().count(PICTURE_ENCODED)
    _answer(daemon, noise_png(8))
    assert loaded >= 1 and daemon.log().count(PROJECTOR_LOADED) == loaded
    assert daemon.log().count(PICTURE_ENCODED) == encoded + 1


@needs_mtmd
def test_prefix_reuse_keeps_the_same_picture_and_drops_another(daemon: Daemon) -> None:
    picture = b64(noise_png(9))
    first_turn = [{"role": "user", "content": "What is it?", "images": [picture]}]
    first = _chat(daemon, "tiny-vl", first_turn)
    assert first.status_code == 200
    answer = first.json()["message"]["content"]
    follow_up = [*first_turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "Sure?"}]
    encoded = daemon.log().count(PICTURE_ENCODED)
    second = _chat(daemon, "tiny-vl", follow_up).json()
    # The picture (16 tokens) and the text around it were reused: not encoded again, not fed again.
    assert daemon.log().count(PICTURE_ENCODED) == encoded
    assert second["prompt_eval_count"] < first.json()["prompt_eval_count"]
    other = [{**follow_up[0], "images": [b64(noise_png(10))]}, *follow_up[1:]]
    third = _chat(daemon, "tiny-vl", other).json()
    # Another picture at the same place: its cells are not the old picture's, so it is encoded and fed.
    assert daemon.log().count(PICTURE_ENCODED) == encoded + 1
    assert third["prompt_eval_count"] > max(16, second["prompt_eval_count"])


@needs_mtmd
def test_bad_pictures_are_a_400(daemon: Daemon) -> None:
    not_an_image = _chat(
        daemon, "tiny-vl", [{"role": "user", "content": "?", "images": [b64(b"plain text, not a picture")]}]
    )
    assert not_an_image.status_code == 400
    assert not_an_image.json()["error"].startswith("messages[0].images[0] is not an image")
    png = noise_png(11, size=(64, 64))
    truncated = _chat(
        daemon,
        "tiny-vl",
        [{"role": "user", "content": "?", "images": [b64(noise_png(12)), b64(png[: len(png) // 2])]}],
    )
    assert truncated.status_code == 400
    assert truncated.json()["error"].startswith("image 2 cannot be decoded (truncated or corrupt)")
    refused = _chat(daemon, "text", [{"role": "user", "content": "?", "images": [b64(png)]}])
    assert (refused.status_code, refused.json()["error"]) == (400, '"text" does not support images')
    many = _chat(daemon, "tiny-vl", [{"role": "user", "content": "?", "images": [b64(png)] * 40}])
    assert many.status_code == 400
    assert many.json()["error"].startswith("the prompt is 6")  # 40 x 16 picture tokens and the text
    assert many.json()["error"].endswith(
        "tokens long (images included), more than the context length of 512 tokens"
    )
    # The runner survived: the model still answers.
    assert _answer(daemon, noise_png(1))


TRUNCATED = "conversation truncated to the context of"


@needs_mtmd
def test_a_chat_whose_pictures_outgrow_the_context_loses_its_oldest_turns(daemon: Daemon) -> None:
    num_ctx = 96  # one turn with its 16-token picture fits; four do not
    options = {**GREEDY, "num_ctx": num_ctx, "num_predict": 4}
    chat: list[dict[str, object]] = []
    for turn in range(4):
        chat.append({"role": "user", "content": f"Picture {turn}?", "images": [b64(noise_png(20 + turn))]})
        chat.append({"role": "assistant", "content": "A picture."})
    chat.pop()
    truncated = daemon.log().count(TRUNCATED)
    encoded = daemon.log().count(PICTURE_ENCODED)
    response = _chat(daemon, "tiny-vl", chat, options=options)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert 0 < reply["prompt_eval_count"] <= num_ctx
    assert reply["prompt_eval_count"] + reply["eval_count"] <= num_ctx
    lines = [line for line in daemon.log().splitlines() if TRUNCATED in line]
    assert len(lines) == truncated + 1
    assert f"{TRUNCATED} {num_ctx} tokens: kept the last" in lines[-1]
    kept = int(lines[-1].split("kept the last ")[1].split()[0])
    assert 1 <= kept < len(chat)
    # Only the kept turns' pictures reached the encoder (one per kept user message).
    assert daemon.log().count(PICTURE_ENCODED) - encoded == (kept + 1) // 2
    # One message whose pictures alone overflow the context is still refused, naming it.
    alone = [{"role": "user", "content": "Which?", "images": [b64(noise_png(30 + i)) for i in range(6)]}]
    refused = _chat(daemon, "tiny-vl", alone, options=options)
    assert refused.status_code == 400
    assert refused.json()["error"].endswith(f"more than the context length of {num_ctx} tokens")


@needs_mtmd
def test_a_chat_shorter_in_bytes_than_the_context_is_still_counted_with_its_pictures(daemon: Daemon) -> None:
    # Three turns of 8 pictures: about 350 bytes of prompt but about 420 tokens (8 x 16 per turn), so
    # the byte-length shortcut would have let it through to a 400 from the runner.
    num_ctx = 400
    options = {**GREEDY, "num_ctx": num_ctx, "num_predict": 4}
    chat: list[dict[str, object]] = []
    for turn in range(3):
        pictures = [b64(noise_png(40 + turn))] * 8
        chat += [{"role": "user", "content": "?", "images": pictures}, {"role": "assistant", "content": "ok"}]
    chat.pop()
    truncated = daemon.log().count(TRUNCATED)
    response = _chat(daemon, "tiny-vl", chat, options=options)
    assert response.status_code == 200, response.text
    assert response.json()["prompt_eval_count"] <= num_ctx
    assert daemon.log().count(TRUNCATED) == truncated + 1


@needs_mtmd
def test_a_raw_prompt_that_would_crash_the_library_is_a_400(daemon: Daemon) -> None:
    _answer(daemon, noise_png(1))
    runner = daemon.runner_pids()
    body = {
        "model": "tiny-vl",
        "prompt": "<s>Describe <image>",
        "raw": True,
        "images": [b64(noise_png(13))],
        "stream": False,
    }
    response = httpx.post(f"{daemon.url}/api/generate", json=body, timeout=120)
    assert (response.status_code, response.json()["error"]) == (
        400,
        "the prompt ends with an image: a prompt needs text after its last image",
    )
    # The library's own media marker in a prompt is only text.
    marker = {**body, "prompt": "<__media__> <image> what is it?"}
    assert httpx.post(f"{daemon.url}/api/generate", json=marker, timeout=120).status_code == 200
    assert runner and daemon.runner_pids() == runner  # the same runner: nothing crashed


@needs_mtmd
def test_show_tags_and_create_with_a_projector(daemon: Daemon, tmp_path: Path) -> None:
    shown = httpx.post(f"{daemon.url}/api/show", json={"model": "tiny-vl"}).json()
    assert "vision" in shown["capabilities"]
    info = shown["projector_info"]
    assert info["general.architecture"] == "clip" and info["clip.projector_type"] == "mlp"
    assert info["clip.vision.image_size"] == 32
    assert "projector_info" not in httpx.post(f"{daemon.url}/api/show", json={"model": "text"}).json()
    tags = {m["name"]: m for m in httpx.get(f"{daemon.url}/api/tags").json()["models"]}
    assert "clip" in tags["tiny-vl:latest"]["details"]["families"]
    assert "vision" in tags["tiny-vl:latest"]["capabilities"]
    assert "vision" not in tags["text:latest"].get("capabilities", [])

    weights = _upload(daemon, write_tiny_gguf(tmp_path / "w.gguf").read_bytes())
    projector = _upload(daemon, write_tiny_mmproj(tmp_path / "p.gguf").read_bytes())
    # Ollama's way: two GGUF files, the projector told by its architecture, whatever the order.
    for files in (
        {"model.gguf": weights, "mmproj-model.gguf": projector},
        {"p.gguf": projector, "m.gguf": weights},
    ):
        created = httpx.post(
            f"{daemon.url}/api/create", json={"model": "made-vl", "files": files, "stream": False}
        )
        assert created.status_code == 200, created.text
        made = httpx.post(f"{daemon.url}/api/show", json={"model": "made-vl"}).json()
        assert "vision" in made["capabilities"] and made["projector_info"]["general.architecture"] == "clip"
    reply = _chat(daemon, "made-vl", [{"role": "user", "content": "?", "images": [b64(noise_png(1))]}])
    assert reply.status_code == 200, reply.text
    two_models = {"model": "bad-vl", "files": {"a.gguf": weights, "b.gguf": weights}, "stream": False}
    refused = httpx.post(f"{daemon.url}/api/create", json=two_models)
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "the second GGUF file is not a multimodal projector (general.architecture clip)",
    )
    mixed = {"model": "bad-vl", "files": {"a.rkllm": weights, "mmproj.gguf": projector}, "stream": False}
    refused = httpx.post(f"{daemon.url}/api/create", json=mixed)
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "a *.gguf projector goes with *.gguf weights",
    )


@needs_mtmd
def test_the_cli_creates_from_an_ollama_modelfile_with_a_projector(daemon: Daemon, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "weights.gguf", context_length=512, attention=ATTENTION)
    write_tiny_mmproj(tmp_path / "projector.gguf")
    (tmp_path / "Modelfile").write_text("FROM ./weights.gguf\nFROM ./projector.gguf\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "RKLLAMA_API_KEY")}
    env["RKLLAMA_HOST"] = f"127.0.0.1:{daemon.port}"
    command = [
        sys.executable,
        "-m",
        "rkllama_ollama.cli",
        "create",
        "cli-vl",
        "-f",
        str(tmp_path / "Modelfile"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    shown = httpx.post(f"{daemon.url}/api/show", json={"model": "cli-vl"}).json()
    assert "vision" in shown["capabilities"] and "FROM projector.gguf" in shown["modelfile"]
    picture = [{"role": "user", "content": "What is in the picture?", "images": [b64(noise_png(1))]}]
    assert _chat(daemon, "cli-vl", picture).json()["message"]["content"] == _answer(daemon, noise_png(1))


@needs_mtmd
def test_a_projector_that_does_not_fit_the_model_is_a_clear_error(daemon: Daemon) -> None:
    response = _chat(daemon, "misfit", [{"role": "user", "content": "?", "images": [b64(noise_png(1))]}])
    assert response.status_code == 500
    error = response.json()["error"]
    assert error.startswith("could not load the projector ") and error.endswith(
        "not a multimodal projector for this model (its output width must match the model's embedding width)"
    )
    assert _answer(daemon, noise_png(1))  # the other models are unaffected


def _upload(daemon: Daemon, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    response = httpx.post(f"{daemon.url}/api/blobs/sha256:{digest}", content=data, timeout=60)
    assert response.status_code in (200, 201), response.text
    return f"sha256:{digest}"
