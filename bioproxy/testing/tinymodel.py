"""
A tiny random-weight llama model, written as GGUF at test time, so that a
real llama-server can run with nothing downloaded and no model committed.

Its vocabulary is byte-fallback SPM: text that is not one of the few pieces
becomes one token per byte, which keeps token counts close to byte counts.
It carries a chatml chat template, like fakellama's.

The same generator writes a "slow" model, for benchmarks and the one test
that needs a request to be in flight for a while: random weights too, but
with enough parameters that its prefill costs about what a real small
model's does on a few CPU cores (a 1,500-token prompt takes seconds).

Run it alone: ``python -m bioproxy.testing.tinymodel out.gguf [tiny|slow]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp's token types
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_PIECES = ["\u2581", "\u2581the", "\u2581a", "er", "in", "on", "\u2581you", "\u2581code", "ing", "ed"]

DIM, LAYERS, HEADS, FFN, CONTEXT = 64, 2, 4, 128, 4096
# (dimension, layers, heads, feed-forward) per size. The slow one has F16
# matrices and heads of 128 dimensions, as most real models do; with 64,
# llama.cpp's CPU flash attention makes a short prompt after a long cached
# prefix several times slower than a real model of this size would be.
SIZES = {"tiny": (DIM, LAYERS, HEADS, FFN), "slow": (1024, 10, 8, 2816)}
HALF = {"slow"}


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    tokens += _PIECES
    types += [_NORMAL] * len(_PIECES)
    scores = [0.0] * (len(tokens) - len(_PIECES)) + [-float(i + 1) for i in range(len(_PIECES))]
    return tokens, scores, types


def write(path: Path, seed: int = 1234, size: str = "tiny", context: int = CONTEXT) -> Path:
    """
    Write the model to path; the same seed, size and context give the same
    file. context: the training context it claims, which caps llama-server's
    context per slot (agents' prompts need more than the default).
    """
    dim, layers, heads, ffn = SIZES[size]
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"bioproxy-{size}")
    writer.add_context_length(context)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    half = size in HALF
    writer.add_file_type(1 if half else 0)  # mostly F16, or all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def matrix(name: str, *shape: int) -> None:
        writer.add_tensor(name, weight(*shape).astype(np.float16) if half else weight(*shape))

    vocab = len(tokens)
    writer.add_tensor("token_embd.weight", weight(vocab, dim))
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, dim))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{name}.weight", dim, dim)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_up.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_down.weight", dim, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    print(
        write(
            Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"),
            size=sys.argv[2] if len(sys.argv) > 2 else "tiny",
        )
    )
