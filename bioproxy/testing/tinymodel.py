# -*- test-case-name: tests.integration.test_architectures -*-
"""
Tiny random-weight models, written as GGUF at test time, so that a
real llama-server can run with nothing downloaded and no model committed.

Its vocabulary is byte-fallback SPM: text that is not one of the few pieces
becomes one token per byte, which keeps token counts close to byte counts.
It carries a chatml chat template, like fakellama's.

The same generator writes a "slow" model, for benchmarks and the one test
that needs a request to be in flight for a while: random weights too, but
with enough parameters that its prefill costs about what a real small
model's does on a few CPU cores (a 1,500-token prompt takes seconds).

Beside the dense llama it writes one model of each architecture whose
memory llama-server cannot cut at an arbitrary position (ARCHITECTURES):
their replies are noise, but their memory layouts (sliding window,
recurrent state, checkpoints, slot files) are llama-server's own.

Run it alone: ``python -m bioproxy.testing.tinymodel out.gguf [tiny|slow|gemma3|qwen35|lfm2]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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

# The architectures it writes, each a kind of memory llama-server treats
# differently: llama's can be cut at any position; gemma3's sliding-window
# layers keep only the last SLIDING_WINDOW positions; qwen35 (gated delta
# net) and lfm2 (short convolution) are hybrids whose recurrent state exists
# only at the last position computed.
ARCHITECTURES = ("llama", "gemma3", "qwen35", "lfm2")
# Shorter than the test templates, as real windows (512 to 4,096) are
# shorter than real templates.
SLIDING_WINDOW = 128


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    tokens += _PIECES
    types += [_NORMAL] * len(_PIECES)
    scores = [0.0] * (len(tokens) - len(_PIECES)) + [-float(i + 1) for i in range(len(_PIECES))]
    return tokens, scores, types


def write(
    path: Path, seed: int = 1234, size: str = "tiny", context: int = CONTEXT, arch: str = "llama"
) -> Path:
    """
    Write the model to path; the same seed, size, context and architecture
    give the same file. context: the training context it claims, which caps
    llama-server's context per slot (agents' prompts need more than the
    default). arch: one of ARCHITECTURES; only llama comes in other sizes.
    """
    import gguf
    import numpy as np

    if arch != "llama" and size != "tiny":
        raise ValueError(f"only the llama architecture comes in size {size!r}")
    rng = np.random.default_rng(seed)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"bioproxy-{size}" if arch == "llama" else f"bioproxy-{arch}")
    writer.add_context_length(context)
    tokens, scores, types = vocabulary()
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
    half = size in HALF
    writer.add_file_type(1 if half else 0)  # mostly F16, or all F32
    _Builder(writer, rng, len(tokens), half).build(arch, size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class _Builder:
    """The tensors and hyperparameters of one architecture, on one GGUF writer."""

    def __init__(self, writer: Any, rng: Any, vocab: int, half: bool) -> None:
        self.w = writer
        self.rng = rng
        self.vocab = vocab
        self.half = half

    def build(self, arch: str, size: str) -> None:
        getattr(self, arch)(size)

    # -- pieces

    def tensor(self, name: str, rows: int, columns: int) -> None:
        """A random matrix that maps columns inputs to rows outputs (numpy's shape, llama.cpp's reversed)."""
        import numpy as np

        value = (self.rng.standard_normal((rows, columns)) * 0.02).astype(np.float32)
        self.w.add_tensor(name, value.astype(np.float16) if self.half and rows > 1 else value)

    def filled(self, name: str, n: int, value: float = 1.0) -> None:
        import numpy as np

        self.w.add_tensor(name, np.full(n, value, dtype=np.float32))

    def common(self, dim: int, layers: int, ffn: int, eps: float = 1e-5) -> None:
        self.w.add_embedding_length(dim)
        self.w.add_block_count(layers)
        self.w.add_feed_forward_length(ffn)
        self.w.add_layer_norm_rms_eps(eps)

    def headShape(self, heads: int, kvHeads: int, head: int) -> None:
        """Attention heads with keys and values of their own size (not the embedding's share)."""
        self.w.add_head_count(heads)
        self.w.add_head_count_kv(kvHeads)
        self.w.add_key_length(head)
        self.w.add_value_length(head)
        self.w.add_rope_dimension_count(head)

    def ends(self, dim: int, norm: str = "output_norm") -> None:
        """The token embeddings, the final norm and the output projection."""
        import numpy as np

        for name in ("token_embd", norm, "output"):
            shape = (dim,) if name == norm else (self.vocab, dim)
            value = np.ones(shape) if name == norm else self.rng.standard_normal(shape) * 0.02
            self.w.add_tensor(f"{name}.weight", value.astype(np.float32))

    def feedForward(self, i: int, dim: int, ffn: int) -> None:
        self.tensor(f"blk.{i}.ffn_gate.weight", ffn, dim)
        self.tensor(f"blk.{i}.ffn_up.weight", ffn, dim)
        self.tensor(f"blk.{i}.ffn_down.weight", dim, ffn)

    def attention(self, i: int, dim: int, heads: int, kvHeads: int, head: int, gated: bool = False) -> None:
        """q, k, v and output projections; a gated q (qwen35) has twice the rows."""
        self.tensor(f"blk.{i}.attn_q.weight", heads * head * (2 if gated else 1), dim)
        self.tensor(f"blk.{i}.attn_k.weight", kvHeads * head, dim)
        self.tensor(f"blk.{i}.attn_v.weight", kvHeads * head, dim)
        self.tensor(f"blk.{i}.attn_output.weight", dim, heads * head)

    # -- architectures

    def llama(self, size: str) -> None:
        """Full attention in every layer: any prefix of its memory can be kept."""
        dim, layers, heads, ffn = SIZES[size]
        self.common(dim, layers, ffn)
        self.w.add_head_count(heads)
        self.w.add_head_count_kv(heads)
        self.w.add_rope_dimension_count(dim // heads)
        self.ends(dim)
        for i in range(layers):
            self.filled(f"blk.{i}.attn_norm.weight", dim)
            self.attention(i, dim, heads, heads, dim // heads)
            self.filled(f"blk.{i}.ffn_norm.weight", dim)
            self.feedForward(i, dim, ffn)

    def gemma3(self, size: str) -> None:
        """Gemma 3's layout: five sliding-window layers, then one global one."""
        dim, layers, heads, kvHeads, head, ffn = 128, 6, 2, 1, 64, 256
        self.common(dim, layers, ffn, 1e-6)
        self.headShape(heads, kvHeads, head)
        self.w.add_rope_freq_base(1e6)
        self.w.add_uint32("gemma3.attention.sliding_window", SLIDING_WINDOW)
        self.w.add_uint32("gemma3.attention.sliding_window_pattern", 6)
        self.ends(dim)
        for i in range(layers):
            for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
                self.filled(f"blk.{i}.{norm}.weight", dim)
            self.filled(f"blk.{i}.attn_q_norm.weight", head)
            self.filled(f"blk.{i}.attn_k_norm.weight", head)
            self.attention(i, dim, heads, kvHeads, head)
            self.feedForward(i, dim, ffn)

    def qwen35(self, size: str) -> None:
        """Qwen 3.5's hybrid: three gated-delta-net (recurrent) layers, then one attention layer."""
        dim, layers, heads, kvHeads, head, ffn = 128, 4, 2, 1, 64, 256
        state, groups, rank, kernel = 32, 2, 2, 4
        inner = state * rank
        mixed = state * groups * 2 + inner  # q, k and v of the delta net, convolved together
        self.common(dim, layers, ffn, 1e-6)
        self.headShape(heads, kvHeads, head)
        self.w.add_array("qwen35.rope.dimension_sections", [11, 11, 10, 0])
        self.w.add_rope_freq_base(1e7)
        for key, value in (
            ("ssm.conv_kernel", kernel),
            ("ssm.inner_size", inner),
            ("ssm.state_size", state),
            ("ssm.time_step_rank", rank),
            ("ssm.group_count", groups),
            ("full_attention_interval", 4),
        ):
            self.w.add_uint32(f"qwen35.{key}", value)
        self.ends(dim)
        for i in range(layers):
            self.filled(f"blk.{i}.attn_norm.weight", dim)
            self.filled(f"blk.{i}.post_attention_norm.weight", dim)
            if i % 4 == 3:
                self.attention(i, dim, heads, kvHeads, head, gated=True)
                self.filled(f"blk.{i}.attn_q_norm.weight", head)
                self.filled(f"blk.{i}.attn_k_norm.weight", head)
            else:
                self.tensor(f"blk.{i}.attn_qkv.weight", mixed, dim)
                self.tensor(f"blk.{i}.attn_gate.weight", inner, dim)
                self.tensor(f"blk.{i}.ssm_conv1d.weight", mixed, kernel)
                self.filled(f"blk.{i}.ssm_dt.bias", rank)
                self.filled(f"blk.{i}.ssm_a", rank, -1.0)
                self.tensor(f"blk.{i}.ssm_beta.weight", rank, dim)
                self.tensor(f"blk.{i}.ssm_alpha.weight", rank, dim)
                self.filled(f"blk.{i}.ssm_norm.weight", state)
                self.tensor(f"blk.{i}.ssm_out.weight", dim, inner)
            self.feedForward(i, dim, ffn)

    def lfm2(self, size: str) -> None:
        """LFM2's hybrid: short-convolution (recurrent) layers, attention in every third."""
        dim, layers, heads, kvHeads, ffn, kernel = 128, 6, 2, 1, 256, 3
        head = dim // heads
        attending = {i for i in range(layers) if i % 3 == 2}
        self.common(dim, layers, ffn)
        self.w.add_head_count(heads)
        self.w.add_array(
            "lfm2.attention.head_count_kv", [kvHeads if i in attending else 0 for i in range(layers)]
        )
        self.w.add_rope_dimension_count(head)
        self.w.add_rope_freq_base(1e6)
        self.w.add_uint32("lfm2.shortconv.l_cache", kernel)
        self.ends(dim, norm="token_embd_norm")
        for i in range(layers):
            self.filled(f"blk.{i}.attn_norm.weight", dim)
            self.filled(f"blk.{i}.ffn_norm.weight", dim)
            self.feedForward(i, dim, ffn)
            if i in attending:
                self.filled(f"blk.{i}.attn_q_norm.weight", head)
                self.filled(f"blk.{i}.attn_k_norm.weight", head)
                self.attention(i, dim, heads, kvHeads, head)
            else:
                self.tensor(f"blk.{i}.shortconv.conv.weight", dim, kernel)
                self.tensor(f"blk.{i}.shortconv.in_proj.weight", 3 * dim, dim)
                self.tensor(f"blk.{i}.shortconv.out_proj.weight", dim, dim)


if __name__ == "__main__":
    kind = sys.argv[2] if len(sys.argv) > 2 else "tiny"
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    print(write(out, arch=kind) if kind in ARCHITECTURES else write(out, size=kind))
