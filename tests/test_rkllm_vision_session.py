"""A vision RKLLM session (RKLLM simulator + RKNN simulator) on every ABI family: the images' embeddings
reach the runtime in order, at their `<image>` tags, with the family's fields; bad input is refused."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rkllama_ollama.runtime.base import (
    PICTURE_CELL,
    ContextOverflow,
    InvalidInput,
    LoadSpec,
    RuntimeFailure,
    SamplingOptions,
)
from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.abi import Family, layout_for
from rkllama_ollama.runtime.rkllm.multimodal import ImageMarkers, multimodal_input
from rkllama_ollama.runtime.rkllm.session import RkllmRuntime
from rkllama_ollama.runtime.rkllm.vision_session import VisionRkllmSession
from tests.rkllm_support.sim import FAMILIES, build_simulators, write_model
from tests.rkllm_support.vision import answer_images, expected_hash, rknn_simulator, solid_png, write_encoder

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 200, 40)
TOKENS, WIDTH = 16, 64


@pytest.fixture(scope="module")
def sims() -> dict[str, Path]:
    libs = build_simulators()
    rknn_simulator()
    return libs


@pytest.fixture(autouse=True)
def rknn_library(monkeypatch: pytest.MonkeyPatch, sims: dict[str, Path]) -> None:
    monkeypatch.setenv("RKLLAMA_RKNN_LIB", str(rknn_simulator()))


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_vision(
    sims: dict[str, Path], family: str, tmp_path: Path
) -> Iterator[Callable[..., VisionRkllmSession]]:
    sessions: list[VisionRkllmSession] = []

    def make(
        num_ctx: int = 4096, encoder: dict[str, object] | None = None, **vision: object
    ) -> VisionRkllmSession:
        folder = tmp_path / f"model{len(sessions)}"
        model = write_model(folder, reply="done", embd_size=WIDTH)
        path = write_encoder(folder, n_tokens=TOKENS, embed_dim=WIDTH, **(encoder or {}))
        spec = LoadSpec(
            engine="rkllm", model_path=str(model), num_ctx=num_ctx, vision={"encoder": str(path), **vision}
        )
        session = RkllmRuntime(str(sims[family])).load(spec)
        assert isinstance(session, VisionRkllmSession)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def _run(session: VisionRkllmSession, prompt: str, images: list[bytes]) -> str:
    pieces: list[str] = []
    session.generate_multimodal(
        prompt, images, SamplingOptions(), lambda text, logprobs=None: pieces.append(text)
    )
    return "".join(pieces)


def _images_per_family(family: str) -> list[tuple[int, int, int]]:
    return [RED] if family in ("C", "D") else [RED, BLUE, GREEN]


def test_each_image_reaches_its_tag_in_order(
    open_vision: Callable[..., VisionRkllmSession], family: str
) -> None:
    colors = _images_per_family(family)
    prompt = "<|user|>" + "".join(f"look {i}: <image> " for i in range(len(colors))) + "which?<|assistant|>"
    answer = _run(open_vision(), prompt, [solid_png(c) for c in colors])
    offsets = [i for i in range(len(prompt)) if prompt.startswith("<image>", i)]
    expected = [(n + 1, offsets[n], expected_hash(c, TOKENS, WIDTH)) for n, c in enumerate(colors)]
    assert answer_images(answer) == expected
    assert answer.startswith(f"images={len(colors)} tokens={TOKENS}")
    assert answer.endswith(". done")
    if family in ("E", "F"):  # D' and later carry the image size (the encoder's input)
        assert " size=448x448 " in answer


def test_swapping_the_images_swaps_the_answer(
    open_vision: Callable[..., VisionRkllmSession], family: str
) -> None:
    if family in ("C", "D"):
        pytest.skip("one image per request on 1.1.x / 1.2.0")
    session = open_vision()
    first = answer_images(_run(session, "<image><image>?", [solid_png(RED), solid_png(BLUE)]))
    second = answer_images(_run(session, "<image><image>?", [solid_png(BLUE), solid_png(RED)]))
    assert [h for _, _, h in first] == [h for _, _, h in reversed(second)]
    assert first[0][2] != first[1][2]


def test_markers_and_domains_go_where_the_family_wants_them(
    open_vision: Callable[..., VisionRkllmSession], family: str
) -> None:
    session = open_vision(img_start="<s>", img_end="</s>", img_content="<c>")
    param = session._param
    assert param.extend_param.base_domain_id == 1  # the encoder keeps domain 0
    if family == "F":
        assert not hasattr(param, "img_start")
    else:
        assert (param.img_start, param.img_end, param.img_content) == (b"<s>", b"</s>", b"<c>")
    assert "done" in _run(session, "<image>?", [solid_png(GREEN)])


@pytest.mark.parametrize("fam", list(Family))
def test_multimodal_input_fields_per_family(fam: Family) -> None:
    layout = layout_for(fam)
    embeddings = np.arange(2 * 3 * 4, dtype=np.float32).reshape(6, 4)
    keep: list[object] = []
    markers = ImageMarkers(b"<s>", b"</s>", b"<c>")
    made = multimodal_input(
        layout,
        b"<image><image>",
        embeddings,
        n_images=2,
        width=448,
        height=336,
        markers=markers,
        keepalive=keep,
    )
    mm = made.multimodal_input
    assert made.input_type == abi.INPUT_MULTIMODAL
    assert mm.prompt == b"<image><image>"
    image = mm.image if fam == Family.F else mm
    assert ctypes.addressof(image.image_embed.contents) == embeddings.ctypes.data
    assert image.n_image_tokens == 3
    if fam >= Family.D_PRIME:
        assert (image.n_image, image.image_width, image.image_height) == (2, 448, 336)
    else:
        assert not hasattr(mm, "n_image")
    if fam == Family.F:
        assert (image.image_start, image.image_end, image.image_content) == (b"<s>", b"</s>", b"<c>")
    if fam >= Family.E:
        assert made.role == b"user"


def test_the_encoder_is_resident_and_embeddings_are_reused(
    open_vision: Callable[..., VisionRkllmSession], caplog: pytest.LogCaptureFixture
) -> None:
    session = open_vision()
    encoder = session.encoder
    caplog.clear()  # only what the three requests log (a daemon in this process may have set INFO already)
    with caplog.at_level(logging.INFO):
        first = _run(session, "<image>a", [solid_png(RED)])
        second = _run(session, "<image>b", [solid_png(RED)])
        third = _run(session, "<image>c", [solid_png(BLUE)])
    assert session.encoder is encoder
    assert answer_images(first)[0][2] == answer_images(second)[0][2] != answer_images(third)[0][2]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("vision encoder initialised" in m for m in messages)
    assert sum("encoded:" in m for m in messages) == 2
    assert sum("embeddings reused" in m for m in messages) == 1


def test_a_text_turn_after_an_image_turn_starts_clean(open_vision: Callable[..., VisionRkllmSession]) -> None:
    session = open_vision()
    _run(session, "<image>what?", [solid_png(RED)])
    pieces: list[str] = []
    stats = session.generate("hello", SamplingOptions(), lambda text, logprobs=None: pieces.append(text))
    assert "".join(pieces) == "done"
    assert stats.prompt_eval_count == len(b"hello")


def test_too_many_images_for_the_context(open_vision: Callable[..., VisionRkllmSession], family: str) -> None:
    session = open_vision(num_ctx=40)
    count = 1 if family in ("C", "D") else 2
    with pytest.raises(
        ContextOverflow, match=r"too many images for the context: .* more than the context window of 40"
    ):
        _run(session, "<image>" * count + "x" * 30, [solid_png(RED)] * count)


def test_tokenize_counts_each_picture_as_the_encoder_output(
    open_vision: Callable[..., VisionRkllmSession], family: str
) -> None:
    session = open_vision(num_ctx=40)
    count = 1 if family in ("C", "D") else 2
    prompt = "<image>" * count + "look" + "x" * 30
    text = session.tokenize("look" + "x" * 30)
    tokens = session.tokenize(prompt)
    assert tokens.count(PICTURE_CELL) == count * TOKENS
    assert [t for t in tokens if t != PICTURE_CELL] == text
    # The count is the one the session refuses a prompt by (more than the 40 of the context).
    with pytest.raises(ContextOverflow, match=f"take {count * TOKENS} tokens .* and the text {len(text)},"):
        _run(session, prompt, [solid_png(RED)] * count)


def test_one_image_only_on_families_without_an_image_count(
    open_vision: Callable[..., VisionRkllmSession], family: str
) -> None:
    if family not in ("C", "D"):
        pytest.skip("D' and later take several images")
    with pytest.raises(InvalidInput, match="takes 1 image per request; this one has 2"):
        _run(open_vision(), "<image><image>", [solid_png(RED), solid_png(BLUE)])


def test_tags_must_match_the_images(open_vision: Callable[..., VisionRkllmSession]) -> None:
    with pytest.raises(InvalidInput, match=r"the prompt has 2 <image> tags for 1 images"):
        _run(open_vision(), "<image><image>", [solid_png(RED)])


def test_a_truncated_image_is_refused_by_name(open_vision: Callable[..., VisionRkllmSession]) -> None:
    data = solid_png(RED, fmt="JPEG")
    with pytest.raises(InvalidInput, match=r"image 1 cannot be decoded \(truncated or corrupt\)"):
        _run(open_vision(), "<image>?", [data[: len(data) // 2]])


def test_a_float_encoder_gets_normalised_pixels(open_vision: Callable[..., VisionRkllmSession]) -> None:
    session = open_vision(encoder={"input_type": "float32", "width": 32, "height": 32}, family="internvl")
    answer = _run(session, "<image>?", [solid_png((124, 116, 104), size=(32, 32))])
    # InternVL normalises with the ImageNet mean/std: this colour is close to the mean, so every
    # embedding is near 0.001 * (d // 3); a uint8 feed would be near colour/256 instead.
    assert session.encoder.shape.dtype == np.float32
    block = session.image_embeddings(solid_png((124, 116, 104), size=(32, 32)), 0)
    assert np.abs(block - 0.001 * (np.arange(WIDTH) // 3)).max() < 0.01
    assert answer_images(answer)


def test_an_encoder_that_fails_to_load_names_the_file(open_vision: Callable[..., VisionRkllmSession]) -> None:
    with pytest.raises(
        RuntimeFailure,
        match=r"could not load the vision encoder .*vision_encoder.rknn: E RKNN: simulated init failure",
    ):
        open_vision(encoder={"fail_init": 1})


def test_an_unknown_family_is_refused(open_vision: Callable[..., VisionRkllmSession]) -> None:
    with pytest.raises(RuntimeFailure, match="unknown vision model family 'llava'"):
        open_vision(family="llava")


def test_a_missing_rknn_runtime_says_how_to_point_at_it(
    open_vision: Callable[..., VisionRkllmSession], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RKLLAMA_RKNN_LIB", str(tmp_path / "nowhere.so"))
    with pytest.raises(RuntimeFailure, match=r"RKLLAMA_RKNN_LIB=.*nowhere.so does not name a file"):
        open_vision()
