"""Images at the door (chat/images.py), the encoder in the store and the Modelfile, picture preparation."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rkllama_ollama.chat.images import (
    ImageError,
    checked_image,
    checked_message_images,
    tagged_messages,
    with_image_tags,
)
from rkllama_ollama.models.modelfile import Modelfile, parse_modelfile
from rkllama_ollama.models.store import Store
from rkllama_ollama.runtime.vision import RECIPES, decode_rgb, family_from_names, prepare
from tests.rkllm_support.sim import add_sim_model
from tests.rkllm_support.vision import b64, solid_png, write_encoder


def test_a_data_url_and_whitespace_are_accepted() -> None:
    text = b64(solid_png((1, 2, 3), size=(4, 4)))
    wrapped = "data:image/png;base64," + text[:10] + "\n" + text[10:]
    assert checked_image(wrapped, "x") == text


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_an_image_error_or_an_image(data: bytes) -> None:
    try:
        checked_image(base64.b64encode(data).decode(), "images[0]")
    except ImageError as exc:
        assert str(exc).startswith("images[0] ")


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_arbitrary_text_is_an_image_error(text: str) -> None:
    try:
        checked_image(text, "images[3]")
    except ImageError as exc:
        assert str(exc).startswith("images[3] ")


def test_tags_go_in_front_unless_the_user_placed_them() -> None:
    assert with_image_tags("what?", 2) == "<image><image>\nwhat?"
    assert with_image_tags("a <image> b <image>", 2) == "a <image> b <image>"
    messages = [{"role": "user", "content": "x", "images": ["i"]}, {"role": "assistant", "content": "y"}]
    assert tagged_messages(messages)[0]["content"] == "<image>\nx"
    assert tagged_messages(messages)[1] == messages[1]


def test_a_stray_tag_in_a_message_without_images_is_refused() -> None:
    with pytest.raises(ImageError, match=r"messages\[1\] has 1 <image> tags for 0 images"):
        checked_message_images([{"role": "user", "content": "a"}, {"role": "user", "content": "<image>"}])


def test_the_projector_round_trips_in_both_modelfile_formats() -> None:
    seed = parse_modelfile('FROM="lm.rkllm"\nVISION_ENCODER="enc.rknn"\nIMG_START="<s>"\n')
    assert (seed.from_, seed.projector, seed.extra) == ("lm.rkllm", "enc.rknn", {"IMG_START": "<s>"})
    ollama = parse_modelfile("FROM ./lm.gguf\nFROM ./mmproj.gguf\n")
    assert (ollama.from_, ollama.projector) == ("./lm.gguf", "./mmproj.gguf")
    mf = Modelfile(from_="lm.rkllm", projector="enc.rknn")
    assert parse_modelfile(mf.to_seed_text()).projector == "enc.rknn"
    assert parse_modelfile(mf.to_ollama_text()).projector == "enc.rknn"


def test_the_store_finds_the_encoder_in_rkllamas_layout(tmp_path: Path) -> None:
    store_dir = tmp_path / "models"
    add_sim_model(store_dir, "auto")  # RKLLama: the folder's one .rknn file, no key
    write_encoder(store_dir / "auto")
    add_sim_model(store_dir, "named", modelfile=('VISION_ENCODER="b.rknn"', 'IMG_CONTENT="<pad>"'))
    write_encoder(store_dir / "named", name="a.rknn")
    write_encoder(store_dir / "named", name="b.rknn")
    add_sim_model(store_dir, "two")
    write_encoder(store_dir / "two", name="a.rknn")
    write_encoder(store_dir / "two", name="b.rknn")
    add_sim_model(store_dir, "plain")
    store = Store(store_dir, offer_embedded=False)
    auto, named, two, plain = (store.resolve(n) for n in ("auto", "named", "two", "plain"))
    assert auto.vision_encoder == store_dir / "auto" / "vision_encoder.rknn"
    assert auto.capabilities[:2] == ["completion", "vision"]
    assert named.vision_settings() == {"encoder": str(store_dir / "named" / "b.rknn"), "img_content": "<pad>"}
    assert two.vision_encoder is None and "vision" not in two.capabilities  # ambiguous: not guessed
    assert plain.vision_encoder is None and plain.vision_settings() == {}


def test_family_recipes_from_file_names() -> None:
    assert family_from_names("Qwen3-VL-2B_w8a8.rkllm") == "qwen3-vl"
    assert family_from_names("internvl3_5-2b_vision_rk3588.rknn") == "internvl"
    assert family_from_names("minicpm-v-4.rkllm") == "minicpm-v"
    assert family_from_names("language_model_w8a8.rkllm", "vision_encoder.rknn") == "qwen2-vl"


def test_qwen_pads_to_a_square_with_the_mean_colour() -> None:
    wide = decode_rgb(solid_png((255, 255, 255), size=(16, 8)), 0)
    pixels = prepare(wide, RECIPES["qwen2-vl"], 16, 16)  # padded to 16x16: no resize
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[0, 4]) == tuple(pixels[15, 4]) == RECIPES["qwen2-vl"].background  # padding bands
    assert (pixels[4:12] == 255).all()
    assert prepare(wide, RECIPES["qwen2-vl"], 8, 8).shape == (8, 8, 3)
    stretched = prepare(wide, RECIPES["internvl"], 8, 8, channels_last=False)
    assert stretched.shape == (3, 8, 8) and (stretched == 255).all()


def test_transparency_is_flattened_onto_white() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue(), 0).getpixel((1, 1)) == (255, 255, 255)
