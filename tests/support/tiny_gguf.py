"""A tiny llama-architecture GGUF written at test time (no download, ~0.7 MB, tens of ms).

Random F32 weights (n_embd 64, 2 layers, 4 heads, n_ff 128) and a SentencePiece-style vocabulary:
the control tokens `<unk>`, `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`, the 256 `<0xXX>` byte
tokens (without them an out-of-vocabulary character kills the process inside llama.cpp), then a few
hundred plain word pieces. EOS is `<|im_end|>`, BOS is `<s>`. The output is deterministic for a seed.

The keys, tensor names and shapes are the ones llama.cpp's `llama` loader requires; the tests load the
file with llama-cpp-python, which refuses a file that lacks any of them.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
WORD_PIECE = "\u2581"  # SentencePiece's word-boundary marker, shown as a space

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_TEXT_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part hello world yes model assistant user system answer question "
    "test token"
).split()

SUPPORTED_ARCHS = ("llama", "qwen2")


def _word_pieces() -> list[str]:
    """Letters, digits, punctuation, and every prefix of a few common words (with and without ▁)."""
    pieces: list[str] = [WORD_PIECE]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        chr(c) for c in range(ord("A"), ord("Z") + 1)
    ]
    pieces += letters
    pieces += [WORD_PIECE + letter for letter in letters]
    pieces += list("0123456789.,!?:;'\"()-")
    for word in _WORDS:
        for form in (WORD_PIECE + word, word):
            pieces += [form[:end] for end in range(2, len(form) + 1)]
    seen: set[str] = set()
    unique: list[str] = []
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            unique.append(piece)
    return unique


def tiny_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """The token texts, scores and token types of the tiny model (same for every seed)."""
    tokens = list(SPECIAL_TOKENS)
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(SPECIAL_TOKENS) - 1)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = _word_pieces()
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SPM merges prefer higher scores: favour longer pieces, ties broken by position.
    scores = [0.0] * (len(SPECIAL_TOKENS) + 256)
    scores += [len(piece) - index * 1e-4 for index, piece in enumerate(pieces)]
    return tokens, scores, [int(t) for t in types]


def _tensors(
    rng: np.random.Generator, n_vocab: int, arch: str, attention: float = 0.02
) -> dict[str, np.ndarray]:
    def random(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": random(n_vocab, N_EMBD, scale=1.0)}
    for block in range(N_LAYER):
        prefix = f"blk.{block}."
        tensors[prefix + "attn_norm.weight"] = ones
        tensors[prefix + "attn_q.weight"] = random(N_EMBD, N_EMBD)
        tensors[prefix + "attn_k.weight"] = random(N_EMBD, N_EMBD)
        tensors[prefix + "attn_v.weight"] = random(N_EMBD, N_EMBD, scale=attention)
        if arch == "qwen2":
            for name in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
                tensors[prefix + name] = random(N_EMBD)
        tensors[prefix + "attn_output.weight"] = random(N_EMBD, N_EMBD, scale=attention)
        tensors[prefix + "ffn_norm.weight"] = ones
        tensors[prefix + "ffn_gate.weight"] = random(N_FF, N_EMBD)
        tensors[prefix + "ffn_up.weight"] = random(N_FF, N_EMBD)
        tensors[prefix + "ffn_down.weight"] = random(N_EMBD, N_FF)
    tensors["output_norm.weight"] = ones
    tensors["output.weight"] = random(n_vocab, N_EMBD, scale=1.0)
    return tensors


def _finish(writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
    """Add the tensors, then write the file: header, metadata, tensor data."""
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(
    path: Path,
    *,
    seed: int = 0,
    chat_template: str | None = CHATML,
    context_length: int = 512,
    arch: str = "llama",
    embedding: bool = False,
    attention: float = 0.02,
) -> Path:
    """Write the tiny model to `path` and return it.

    `arch` is "llama" (default) or "qwen2" (same shapes plus q/k/v biases). `embedding=True`
    declares mean pooling in the metadata, i.e. the file presents itself as an embedding model.
    `chat_template=None` leaves `tokenizer.chat_template` out. `attention` scales the attention's value
    and output weights: at the default the answer hangs almost on the last token alone; the vision tests
    raise it so that what came before (a picture) sways the answer.
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}")
    path = Path(path)
    tokens, scores, types = tiny_vocabulary()
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Tiny Test Model")
    writer.add_basename("tiny-test")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    if embedding:
        writer.add_pooling_type(gguf.PoolingType.MEAN)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    _finish(writer, _tensors(rng, len(tokens), arch, attention))
    return path


# A tiny LLaVA-style projector for the tiny model: a CLIP vision tower (32x32 pictures, 8x8 patches,
# so 16 image tokens, width 32, 2 blocks of which llava uses the first) and the two-layer MLP
# projector into the model's embedding width. Random F32 weights; llama.cpp's multimodal library loads
# it like any `mmproj*.gguf`.
MMPROJ_IMAGE_SIZE = 32
MMPROJ_PATCH_SIZE = 8
MMPROJ_TOKENS = (MMPROJ_IMAGE_SIZE // MMPROJ_PATCH_SIZE) ** 2
_V_EMBD = 32
_V_HEAD = 4
_V_FF = 64
_V_LAYER = 2


def _mmproj_tensors(rng: np.random.Generator, n_embd: int) -> dict[str, np.ndarray]:
    def random(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(_V_EMBD, dtype=np.float32)
    zeros = np.zeros(_V_EMBD, dtype=np.float32)
    n_pos = MMPROJ_TOKENS + 1  # the patches and the class embedding
    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": random(_V_EMBD, 3, MMPROJ_PATCH_SIZE, MMPROJ_PATCH_SIZE, scale=0.2),
        "v.patch_embd.bias": random(_V_EMBD, scale=0.1),
        "v.class_embd": random(_V_EMBD),
        "v.position_embd.weight": random(n_pos, _V_EMBD, scale=0.1),
        "v.pre_ln.weight": ones,
        "v.pre_ln.bias": zeros,
    }
    for block in range(_V_LAYER):
        prefix = f"v.blk.{block}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[prefix + name + ".weight"] = random(_V_EMBD, _V_EMBD, scale=0.2)
            tensors[prefix + name + ".bias"] = random(_V_EMBD, scale=0.05)
        for name in ("ln1", "ln2"):
            tensors[prefix + name + ".weight"] = ones
            tensors[prefix + name + ".bias"] = zeros
        tensors[prefix + "ffn_up.weight"] = random(_V_FF, _V_EMBD, scale=0.2)
        tensors[prefix + "ffn_up.bias"] = random(_V_FF, scale=0.05)
        tensors[prefix + "ffn_down.weight"] = random(_V_EMBD, _V_FF, scale=0.2)
        tensors[prefix + "ffn_down.bias"] = random(_V_EMBD, scale=0.05)
    # Large projector weights: the picture's tokens must sway the tiny model's answer.
    tensors["mm.0.weight"] = random(n_embd, _V_EMBD, scale=1.0)
    tensors["mm.0.bias"] = random(n_embd, scale=0.1)
    tensors["mm.2.weight"] = random(n_embd, n_embd, scale=1.0)
    tensors["mm.2.bias"] = random(n_embd, scale=0.1)
    return tensors


def write_tiny_mmproj(path: Path, *, seed: int = 0, n_embd: int = N_EMBD) -> Path:
    """Write the tiny projector (`general.architecture` clip, projector type mlp) to `path`; `n_embd` is
    the width it projects to (the tiny model's unless a test wants a projector that does not fit)."""
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("Tiny Test Projector")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", MMPROJ_IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", MMPROJ_PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", _V_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", _V_FF)
    writer.add_uint32("clip.vision.projection_dim", n_embd)
    writer.add_uint32("clip.vision.block_count", _V_LAYER)
    writer.add_uint32("clip.vision.attention.head_count", _V_HEAD)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    _finish(writer, _mmproj_tensors(np.random.default_rng(seed + 1000), n_embd))
    return path
