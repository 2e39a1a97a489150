"""Images through every face, end to end: the daemon serving a vision model on the simulators (RKLLM
1.3.0 + RKNN), driven with ollama-python, openai-python and Open WebUI's request shapes."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
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

from rkllama_ollama.cli.repl import extract_images
from tests.rkllm_support.sim import SIM_VERSIONS, add_sim_model, build_simulators, write_byte_tokenizer
from tests.rkllm_support.vision import (
    answer_images,
    b64,
    expected_hash,
    rknn_simulator,
    solid_png,
    write_encoder,
)
from tests.support.daemon import Daemon

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
TOKENS, WIDTH = 16, 64
ROOMY = 210  # the context of a model that holds two turns with a picture each, not three
ENCODER_INIT = "vision encoder initialised"


def add_vision_model(
    store: Path, name: str, *, encoder: dict[str, object] | None = None, **keys: object
) -> None:
    add_sim_model(store, name, reply="done", embd_size=WIDTH, **keys)
    write_encoder(store / name, n_tokens=TOKENS, embed_dim=WIDTH, **(encoder or {}))
    write_byte_tokenizer(store / name / "tokenizer")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    library = build_simulators()["F"]
    store = tmp_path_factory.mktemp("vision") / "models"
    add_vision_model(store, "vision")
    add_vision_model(store, "crashy", encoder={"crash_on_run": 1})
    add_vision_model(store, "small", max_context_len=40)
    add_vision_model(store, "roomy", max_context_len=ROOMY)
    add_sim_model(store, "text", reply="plain", tokenizer=True)
    env = {
        "RKLLAMA_RKLLM_LIB": str(library),
        "RKLLAMA_RKLLM_VERSION": SIM_VERSIONS["F"],
        "RKLLAMA_RKNN_LIB": str(rknn_simulator()),
    }
    with Daemon(store, env=env).start() as server:
        yield server


def _expect_two(answer: str) -> None:
    images = answer_images(answer)
    assert [(n, h) for n, _, h in images] == [
        (1, expected_hash(RED, TOKENS, WIDTH)),
        (2, expected_hash(BLUE, TOKENS, WIDTH)),
    ]
    assert images[0][1] < images[1][1]  # the first picture's tag comes first in the prompt
    assert answer.endswith(". done")


def test_two_images_through_ollama_python_streamed_and_not(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    messages = [{"role": "user", "content": "Compare them.", "images": [solid_png(RED), solid_png(BLUE)]}]
    whole = client.chat("vision", messages=messages, stream=False)
    _expect_two(whole.message.content)
    streamed = "".join(c.message.content for c in client.chat("vision", messages=messages, stream=True))
    _expect_two(streamed)
    swapped = [{**messages[0], "images": [solid_png(BLUE), solid_png(RED)]}]
    hashes = [h for _, _, h in answer_images(client.chat("vision", messages=swapped).message.content)]
    assert hashes == [expected_hash(BLUE, TOKENS, WIDTH), expected_hash(RED, TOKENS, WIDTH)]


def test_images_in_two_messages_keep_the_conversation_order(daemon: Daemon) -> None:
    messages = [
        {"role": "user", "content": "First picture.", "images": [b64(solid_png(RED))]},
        {"role": "assistant", "content": "Seen."},
        {"role": "user", "content": "And this one?", "images": [b64(solid_png(BLUE))]},
    ]
    _expect_two(ollama.Client(host=daemon.url).chat("vision", messages=messages).message.content)


def test_two_images_through_openai_python_streamed_and_not(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
    content = [
        {"type": "text", "text": "Compare them."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(solid_png(RED))}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(solid_png(BLUE))}},
    ]
    messages = [{"role": "user", "content": content}]
    whole = client.chat.completions.create(model="vision", messages=messages)  # type: ignore[arg-type]
    _expect_two(whole.choices[0].message.content or "")
    stream = client.chat.completions.create(model="vision", messages=messages, stream=True)  # type: ignore[arg-type]
    _expect_two("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))


def test_generate_takes_images(daemon: Daemon) -> None:
    reply = ollama.Client(host=daemon.url).generate(
        "vision", prompt="Compare them.", images=[solid_png(RED), solid_png(BLUE)], stream=False
    )
    _expect_two(reply.response)


def test_a_second_request_reuses_the_resident_encoder(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    first = [{"role": "user", "content": "one", "images": [solid_png((10, 20, 30))]}]
    client.chat("vision", messages=first)
    before = daemon.log().count(ENCODER_INIT)
    second = [{"role": "user", "content": "two", "images": [solid_png((40, 50, 60))]}]
    answer = client.chat("vision", messages=second).message.content
    assert answer_images(answer)[0][2] == expected_hash((40, 50, 60), TOKENS, WIDTH)
    assert before >= 1 and daemon.log().count(ENCODER_INIT) == before


def test_open_webui_request_shapes(daemon: Daemon) -> None:
    """Open WebUI sends the user's chat streamed (model, messages, stream, tools) with the picture as
    bare base64 in `images` (Ollama connection) while its non-streamed title request runs alongside."""
    picture = b64(solid_png(RED))
    chat = {
        "model": "vision",
        "messages": [{"role": "user", "content": "What is this?", "images": [picture]}],
        "stream": True,
        "tools": [],
    }
    title = {
        "model": "vision",
        "messages": [{"role": "user", "content": "### Task: Generate a concise title for: What is this?"}],
        "stream": False,
        "options": {"num_predict": 1000},
    }
    with (
        httpx.Client(base_url=daemon.url, timeout=60) as http,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        background = pool.submit(http.post, "/api/chat", json=title)
        with http.stream("POST", "/api/chat", json=chat) as response:
            assert response.status_code == 200
            lines = [ollama.ChatResponse.model_validate_json(line) for line in response.iter_lines() if line]
        assert background.result().status_code == 200
    answer = "".join(line.message.content for line in lines)
    assert answer_images(answer)[0][2] == expected_hash(RED, TOKENS, WIDTH)
    # The OpenAI connection: the same picture as an image_url part.
    body = {
        "model": "vision",
        "stream": False,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + picture}},
                ],
            }
        ],
    }
    reply = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200
    assert answer_images(reply.json()["choices"][0]["message"]["content"])[0][2] == expected_hash(
        RED, TOKENS, WIDTH
    )


def test_vision_capability_in_show_and_tags(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    assert "vision" in (client.show("vision").capabilities or [])
    shown = httpx.post(f"{daemon.url}/api/show", json={"model": "vision"}).json()
    assert shown["projector_info"]["general.file_name"] == "vision_encoder.rknn"
    assert "projector_info" not in httpx.post(f"{daemon.url}/api/show", json={"model": "text"}).json()
    assert "vision" not in (client.show("text").capabilities or [])
    tags = httpx.get(f"{daemon.url}/api/tags").json()["models"]
    capabilities = {m["name"]: m.get("capabilities", []) for m in tags}
    assert "vision" in capabilities["vision:latest"] and "vision" not in capabilities["text:latest"]


def _chat_error(daemon: Daemon, model: str, images: list[str], content: str = "look") -> tuple[int, str]:
    body = {
        "model": model,
        "stream": False,
        "messages": [{"role": "user", "content": content, "images": images}],
    }
    response = httpx.post(f"{daemon.url}/api/chat", json=body, timeout=60)
    return response.status_code, response.json().get("error", "")


def _big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([base64.b64encode(b"hello, not a picture").decode()], "messages[0].images[0] is not an image"),
        (["@@not base64@@"], "messages[0].images[0] is not valid base64"),
        ([b64(solid_png(RED)), ""], "messages[0].images[1] is empty"),
        ([b64(_big_png())], "messages[0].images[0] is 10000x5000 pixels, more than the 40 megapixel limit"),
        ([b64(_tiff())], "messages[0].images[0] is a TIFF image; PNG, JPEG, WebP, GIF or BMP expected"),
    ],
)
def test_bad_images_are_refused_at_the_door(daemon: Daemon, images: list[str], message: str) -> None:
    status, error = _chat_error(daemon, "vision", images)
    assert status == 400 and error.startswith(message), error


def test_a_truncated_image_is_a_400_naming_it(daemon: Daemon) -> None:
    jpeg = solid_png(RED, fmt="JPEG")
    status, error = _chat_error(daemon, "vision", [b64(solid_png(BLUE)), b64(jpeg[: len(jpeg) // 2])])
    assert status == 400 and error.startswith("image 2 cannot be decoded (truncated or corrupt)")


def test_too_many_images_for_the_context(daemon: Daemon) -> None:
    status, error = _chat_error(daemon, "small", [b64(solid_png(RED))] * 3)
    assert status == 400 and error.startswith("too many images for the context: 3 images take 48 tokens")


def test_a_chat_whose_pictures_outgrow_the_context_loses_its_oldest_turns(daemon: Daemon) -> None:
    # Three turns with a picture each, the first one wordy: 222 tokens with each picture's 16 (195 if
    # the tags counted as text), in a context of 210. The first turn goes, with its picture; what stays
    # leaves the simulator (which counts the prompt's bytes) room for its answer naming the pictures.
    messages: list[dict[str, object]] = []
    for word, color in (("one", RED), ("two", BLUE), ("three", GREEN)):
        text = f"Which {word}?" + (" " + "so " * 20 if color == RED else "")
        messages.append({"role": "user", "content": text, "images": [b64(solid_png(color))]})
        messages.append({"role": "assistant", "content": "Seen."})
    messages.pop()
    body = {"model": "roomy", "stream": False, "messages": messages}
    response = httpx.post(f"{daemon.url}/api/chat", json=body, timeout=60)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert 0 < reply["prompt_eval_count"] <= ROOMY
    # The runtime saw the last two pictures only, in their order.
    hashes = [h for _, _, h in answer_images(reply["message"]["content"])]
    assert hashes == [expected_hash(BLUE, TOKENS, WIDTH), expected_hash(GREEN, TOKENS, WIDTH)]
    assert f"conversation truncated to the context of {ROOMY} tokens: kept the last 3 of 5" in daemon.log()
    # One message whose pictures alone overflow the context is still refused, naming it.
    status, error = _chat_error(daemon, "roomy", [b64(solid_png(RED))] * 13)
    assert status == 400
    assert error.startswith("too many images for the context: 13 images take 208 tokens"), error
    assert f"more than the context window of {ROOMY} tokens (num_ctx)" in error


def test_tags_that_do_not_match_the_images(daemon: Daemon) -> None:
    status, error = _chat_error(daemon, "vision", [b64(solid_png(RED))], content="<image> and <image>")
    assert (status, error) == (
        400,
        "messages[0] has 2 <image> tags for 1 images; leave the tags out or give one per image",
    )


def test_a_text_model_refuses_images(daemon: Daemon) -> None:
    assert _chat_error(daemon, "text", [b64(solid_png(RED))]) == (400, '"text" does not support images')


def test_a_text_model_refuses_images_on_every_face(daemon: Daemon) -> None:
    """request_checks.py answers for every face, each in its own error shape."""
    picture = b64(solid_png(RED))
    data_url = f"data:image/png;base64,{picture}"
    generate = httpx.post(
        f"{daemon.url}/api/generate",
        json={"model": "text", "prompt": "look", "images": [picture], "stream": False},
        timeout=60,
    )
    assert (generate.status_code, generate.json()["error"]) == (400, '"text" does not support images')
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": data_url}}]
    chat = httpx.post(
        f"{daemon.url}/v1/chat/completions",
        json={"model": "text", "messages": [{"role": "user", "content": parts}]},
        timeout=60,
    )
    assert (chat.status_code, chat.json()["error"]["message"]) == (400, '"text" does not support images')
    content = [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": data_url}]
    responses = httpx.post(
        f"{daemon.url}/v1/responses",
        json={"model": "text", "input": [{"role": "user", "content": content}]},
        timeout=60,
    )
    assert (responses.status_code, responses.json()["error"]["message"]) == (
        400,
        '"text" does not support images',
    )


def test_an_http_image_url_is_a_clear_400(daemon: Daemon) -> None:
    body = {
        "model": "vision",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x.invalid/a.png"}}],
            }
        ],
    }
    response = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "image URLs are not currently supported, please use base64 encoded data instead"
    )


def test_an_encoder_crash_costs_one_request(daemon: Daemon) -> None:
    status, error = _chat_error(daemon, "crashy", [b64(solid_png(RED))])
    assert status == 500 and "the model runner was killed by signal SIGSEGV" in error
    answer = ollama.Client(host=daemon.url).chat(
        "vision", messages=[{"role": "user", "content": "again", "images": [solid_png(RED)]}]
    )
    assert answer_images(answer.message.content)[0][2] == expected_hash(RED, TOKENS, WIDTH)


def test_the_native_generate_takes_message_images(daemon: Daemon) -> None:
    body = {
        "model": "vision",
        "stream": False,
        "messages": [{"role": "user", "content": "?", "images": [b64(solid_png(RED)), b64(solid_png(BLUE))]}],
    }
    reply = httpx.post(f"{daemon.url}/generate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert "images=2" in reply.text
    text_model = {**body, "model": "text"}
    refused = httpx.post(f"{daemon.url}/generate", json=text_model, timeout=60)
    assert (refused.status_code, refused.json()["error"]) == (400, '"text" does not support images')


def test_bad_base64_past_the_header_is_a_400_from_the_runner(daemon: Daemon) -> None:
    noisy = np.random.default_rng(1).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    text = b64(buffer.getvalue())
    assert len(text) > 100_000  # the door reads only the beginning
    status, error = _chat_error(daemon, "vision", [text[:-8] + "!!!!!!!!"])
    assert (status, error) == (400, "image 1 is not valid base64")


def test_the_cli_sends_picture_files_named_in_the_prompt(daemon: Daemon, tmp_path: Path) -> None:
    red, blue = tmp_path / "red one.png", tmp_path / "blue.jpg"
    red.write_bytes(solid_png(RED))
    blue.write_bytes(solid_png(BLUE))
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "RKLLAMA_API_KEY")}
    env["RKLLAMA_HOST"] = f"127.0.0.1:{daemon.port}"
    prompt = f"compare '{red}' with {blue} please"
    result = subprocess.run(
        [sys.executable, "-m", "rkllama_ollama.cli", "run", "vision", prompt],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"Added image '{red}'" in result.stdout and f"Added image '{blue}'" in result.stdout
    hashes = [h for _, _, h in answer_images(result.stdout)]
    assert hashes == [expected_hash(RED, TOKENS, WIDTH), expected_hash(BLUE, TOKENS, WIDTH)]


def test_extract_images_leaves_the_rest_of_the_prompt(tmp_path: Path) -> None:
    picture = tmp_path / "a b.png"
    picture.write_bytes(solid_png(RED, size=(4, 4)))
    text, files = extract_images(f'what is in "{picture}" and /no/such.png?')
    assert files == [picture] and text == "what is in and /no/such.png?"


def _upload(daemon: Daemon, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    response = httpx.post(f"{daemon.url}/api/blobs/sha256:{digest}", content=data, timeout=60)
    assert response.status_code in (200, 201), response.text
    return f"sha256:{digest}"


def test_create_takes_the_encoder_with_the_weights(daemon: Daemon, tmp_path: Path) -> None:
    source = daemon.models_dir / "vision"
    files = {
        "lm.rkllm": _upload(daemon, (source / "sim.rkllm").read_bytes()),
        "enc.rknn": _upload(daemon, (source / "vision_encoder.rknn").read_bytes()),
    }
    body = {"model": "made-vision", "files": files, "stream": False}
    response = httpx.post(f"{daemon.url}/api/create", json=body, timeout=60)
    assert response.status_code == 200, response.text
    shown = httpx.post(f"{daemon.url}/api/show", json={"model": "made-vision"}).json()
    assert "vision" in shown["capabilities"] and "FROM enc.rknn" in shown["modelfile"]
    derived = {"model": "made-vision-terse", "from": "made-vision", "system": "Be terse.", "stream": False}
    assert httpx.post(f"{daemon.url}/api/create", json=derived, timeout=60).status_code == 200
    assert (
        "vision"
        in httpx.post(f"{daemon.url}/api/show", json={"model": "made-vision-terse"}).json()["capabilities"]
    )
    bad = {"model": "bad", "files": {"lm.gguf": files["lm.rkllm"], "enc.rknn": files["enc.rknn"]}}
    refused = httpx.post(f"{daemon.url}/api/create", json=bad, timeout=60)
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "a *.rknn vision encoder goes with *.rkllm weights",
    )
    # The CLI's create: an Ollama Modelfile whose second FROM names the encoder.
    (tmp_path / "lm.rkllm").write_bytes((source / "sim.rkllm").read_bytes())
    (tmp_path / "enc.rknn").write_bytes((source / "vision_encoder.rknn").read_bytes())
    (tmp_path / "Modelfile").write_text("FROM ./lm.rkllm\nFROM ./enc.rknn\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "RKLLAMA_API_KEY")}
    env["RKLLAMA_HOST"] = f"127.0.0.1:{daemon.port}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rkllama_ollama.cli",
            "create",
            "cli-vision",
            "-f",
            str(tmp_path / "Modelfile"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "vision" in httpx.post(f"{daemon.url}/api/show", json={"model": "cli-vision"}).json()["capabilities"]
    )
