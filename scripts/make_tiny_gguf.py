#!/usr/bin/env python3
"""Write a random-weight llama-architecture GGUF that llama-server can load and serve.

The model talks nonsense, but it exercises the real load path and the real HTTP API, which is what
swapproxy's integration tests and benchmarks need. The tokenizer is copied from one of llama.cpp's
vocab-only GGUFs; ``scripts/build_llama_server.sh --vocab-dir`` prints the directory holding them.

Load time is dominated by parsing the tokenizer (twice with llama-server's default ``-fit on``),
then by the layer count; weight size hardly matters because llama-server mmaps the file. The
presets pick a vocab file and a shape::

    VOCAB_DIR=$(scripts/build_llama_server.sh --vocab-dir)
    make_tiny_gguf.py --vocab-dir "$VOCAB_DIR" --out tiny.gguf                    # 9 MB
    make_tiny_gguf.py --vocab-dir "$VOCAB_DIR" --out slow.gguf --preset slow      # 83 MB
    make_tiny_gguf.py --vocab-dir "$VOCAB_DIR" --out slow.gguf --preset slow-fit-off  # 104 MB
    make_tiny_gguf.py --vocab-dir "$VOCAB_DIR" --out prompt.gguf --preset prompt      # 402 MB

Time until ``GET /health`` answers 200 for ``llama-server -m M -c 512 -ngl 0`` on 2 cores of an
AMD EPYC (llama.cpp from llama-cpp-python 0.3.36; lower end on an idle machine, upper end with other
jobs running; see scripts/README.md):

    ============  ==============  ==============  =======
    preset        default flags   ``-fit off``    size
    ============  ==============  ==============  =======
    tiny          0.14-0.25 s     0.09-0.15 s     9 MB
    slow          1.7-2.6 s       0.9-1.3 s       83 MB
    slow-fit-off  2.7-3.8 s       1.4-2.2 s       104 MB
    prompt                        0.2-1.6 s       402 MB
    ============  ==============  ==============  =======

``prompt`` is the one whose prompts cost: 3518 prompt tokens take 11 s (320 tokens/s) with
``-c 8192``, where ``tiny`` processes 100,000 tokens a second; its slot takes 12 kB per token.

Writing a model takes 0.7 s (tiny), 2.6 s (slow) or 4.6 s (slow-fit-off); the output depends only on
the arguments, so callers can cache it.

Requires the ``gguf`` and ``numpy`` packages (``pip install gguf``).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("make_tiny_gguf.py: the gguf package is missing; install it with: pip install gguf numpy")


# A ChatML template, so /v1/chat/completions works without --chat-template. It is plain Jinja that
# llama-server's own template engine accepts, and its <|im_start|> marker also lets llama.cpp's
# built-in template detection recognise it as "chatml".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp refuses models with more blocks than this (LLAMA_MAX_LAYERS).
MAX_LAYERS = 512

# Shapes worth remembering; any flag given on the command line overrides the preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab": "ggml-vocab-llama-spm.gguf", "layers": 2, "embd": 64, "heads": 4, "ff": 128},
    "slow": {"vocab": "ggml-vocab-llama-bpe.gguf", "layers": 512, "embd": 64, "heads": 4, "ff": 128},
    "slow-fit-off": {"vocab": "ggml-vocab-gemma-4.gguf", "layers": 256, "embd": 64, "heads": 4, "ff": 128},
    # Wide enough that a prompt of a few thousand tokens takes seconds on 2 cores, with an 8k
    # context and grouped-query attention (4 KV heads for 16) as today's models have, so that a
    # token of KV cache is small for what it cost: the slot cache benchmark (bench/slots.py).
    "prompt": {"vocab": "ggml-vocab-llama-spm.gguf", "layers": 12, "embd": 1024, "heads": 16, "kv_heads": 4,
               "ff": 2816, "ctx": 8192},
}

_DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


class VocabError(Exception):
    """The vocab GGUF cannot provide a tokenizer."""


# struct format of each fixed-size GGUF value type (GGUF is little-endian).
_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}

TokenizerEntry = tuple[str, Any, gguf.GGUFValueType, "gguf.GGUFValueType | None"]


class _KVParser:
    """Reads the metadata section of a GGUF file.

    ``gguf.GGUFReader`` builds a numpy view per array element, which takes 10-30 s for the large
    BPE vocabularies; the metadata layout is simple enough to walk directly in well under a second.
    """

    def __init__(self, data: bytes, path: Path) -> None:
        self._data = data
        self._path = path
        self.offset = 0

    def _fail(self, problem: str) -> VocabError:
        return VocabError(f"{self._path}: not a readable GGUF file ({problem} at byte {self.offset})")

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self._data, self.offset)
        except struct.error:
            raise self._fail("truncated") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        length = self.unpack("<Q")
        if self.offset + length > len(self._data):
            raise self._fail("truncated string")
        value = self._data[self.offset : self.offset + length]
        self.offset += length
        return value

    def _strings(self, count: int) -> list[bytes]:
        # The hot loop for 100k-token vocabularies, hence no per-item method calls.
        data, offset, read_length = self._data, self.offset, struct.Struct("<Q").unpack_from
        items = []
        try:
            for _ in range(count):
                (length,) = read_length(data, offset)
                offset += 8
                items.append(data[offset : offset + length])
                offset += length
        except struct.error:
            raise self._fail("truncated string array") from None
        if offset > len(data):
            raise self._fail("truncated string array")
        self.offset = offset
        return items

    def value_type(self) -> gguf.GGUFValueType:
        raw = self.unpack("<I")
        try:
            return gguf.GGUFValueType(raw)
        except ValueError:
            raise self._fail(f"unknown value type {raw}") from None

    def value(self, value_type: gguf.GGUFValueType) -> tuple[Any, gguf.GGUFValueType | None]:
        """Return ``(value, array_item_type)``; strings stay bytes, arrays become lists."""
        if value_type == gguf.GGUFValueType.STRING:
            return self.string(), None
        if value_type != gguf.GGUFValueType.ARRAY:
            return self.unpack(_SCALAR_FORMATS[value_type]), None
        item_type = self.value_type()
        count = self.unpack("<Q")
        if item_type == gguf.GGUFValueType.STRING:
            return self._strings(count), item_type
        if item_type == gguf.GGUFValueType.ARRAY:
            raise self._fail("nested arrays are not supported")
        fmt = _SCALAR_FORMATS[item_type]
        size = struct.calcsize(fmt)
        if self.offset + count * size > len(self._data):
            raise self._fail("truncated array")
        items = np.frombuffer(self._data, dtype=np.dtype(fmt), count=count, offset=self.offset).tolist()
        self.offset += count * size
        return items, item_type


def read_tokenizer(vocab_path: Path) -> list[TokenizerEntry]:
    """Read every ``tokenizer.*`` key of a GGUF file, keeping the stored value types.

    :param vocab_path: a GGUF file, usually one of llama.cpp's ``ggml-vocab-*.gguf``.
    :returns: ``(key, value, type, array_item_type)`` tuples ready for ``GGUFWriter.add_key_value``.
        Strings are returned as raw bytes so that tokens which are not valid UTF-8 survive intact.
    :raises VocabError: if the file is not GGUF or has no ``tokenizer.ggml.tokens`` array.
    """
    parser = _KVParser(vocab_path.read_bytes(), vocab_path)
    if parser.unpack("<I") != gguf.GGUF_MAGIC:
        raise VocabError(f"{vocab_path}: not a GGUF file (bad magic); pass one of llama.cpp's ggml-vocab-*.gguf files")
    version = parser.unpack("<I")
    if version not in (2, 3):
        raise VocabError(f"{vocab_path}: GGUF version {version} is not supported (expected 2 or 3)")
    parser.unpack("<Q")  # tensor count: vocab files have none, and we never need them
    kv_count = parser.unpack("<Q")
    entries: list[TokenizerEntry] = []
    for _ in range(kv_count):
        key = parser.string().decode("utf-8", errors="replace")
        value_type = parser.value_type()
        value, item_type = parser.value(value_type)
        if key.startswith("tokenizer."):
            entries.append((key, value, value_type, item_type))
    if not any(key == "tokenizer.ggml.tokens" for key, *_ in entries):
        raise VocabError(
            f"{vocab_path}: no tokenizer.ggml.tokens array; pass one of llama.cpp's ggml-vocab-*.gguf files"
        )
    return entries


def tensor_shapes(
    layers: int, embd: int, heads: int, kv_heads: int, ff: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and numpy shapes of the tensors llama.cpp's llama architecture expects.

    numpy shapes are the reverse of ggml's ``ne``: ``token_embd`` is ``ne = {n_embd, n_vocab}``.
    """
    head_dim = embd // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (vocab, embd)),
        ("output_norm.weight", (embd,)),
        ("output.weight", (vocab, embd)),
    ]
    for n in range(layers):
        shapes += [
            (f"blk.{n}.attn_norm.weight", (embd,)),
            (f"blk.{n}.attn_q.weight", (heads * head_dim, embd)),
            (f"blk.{n}.attn_k.weight", (kv_heads * head_dim, embd)),
            (f"blk.{n}.attn_v.weight", (kv_heads * head_dim, embd)),
            (f"blk.{n}.attn_output.weight", (embd, heads * head_dim)),
            (f"blk.{n}.ffn_norm.weight", (embd,)),
            (f"blk.{n}.ffn_gate.weight", (ff, embd)),
            (f"blk.{n}.ffn_up.weight", (ff, embd)),
            (f"blk.{n}.ffn_down.weight", (embd, ff)),
        ]
    return shapes


def write_model(
    vocab_path: Path,
    out_path: Path,
    *,
    layers: int,
    embd: int,
    heads: int,
    kv_heads: int,
    ff: int,
    ctx: int,
    seed: int,
    dtype: str,
    chat_template: str | None,
    name: str,
) -> int:
    """Write the model to ``out_path`` (atomically, via a temporary file) and return its size in bytes.

    Norm weights are 1; every other weight is drawn from N(0, 0.02^2) with a generator seeded by
    ``seed``, so the same arguments always give the same file.

    :param chat_template: stored as ``tokenizer.chat_template``; ``None`` keeps the vocab's own.
    """
    tokenizer = read_tokenizer(vocab_path)
    n_vocab = next(len(value) for key, value, *_ in tokenizer if key == "tokenizer.ggml.tokens")
    np_dtype, file_type = _DTYPES[dtype]

    arch = "llama"
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(ctx)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(embd // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    for key, value, value_type, item_type in tokenizer:
        if key == "tokenizer.chat_template" and chat_template is not None:
            continue
        writer.add_key_value(key, value, value_type, sub_type=item_type)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    rng = np.random.default_rng(seed)
    for tensor_name, shape in tensor_shapes(layers, embd, heads, kv_heads, ff, n_vocab):
        if tensor_name.endswith("_norm.weight"):
            data = np.ones(shape, dtype=np.float32)  # norms stay f32, as llama.cpp's converters do
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)
        writer.add_tensor(tensor_name, data)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path.stat().st_size


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a random-weight llama GGUF with a real tokenizer, for testing llama-server.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vocab", type=Path, help="vocab-only GGUF to take the tokenizer from")
    source.add_argument(
        "--vocab-dir",
        type=Path,
        help="directory of llama.cpp's ggml-vocab-*.gguf files; the preset picks one",
    )
    parser.add_argument("--out", required=True, type=Path, help="GGUF file to write")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="tiny",
        help="vocab file and shape to start from (default: tiny); see the module docstring for load times",
    )
    parser.add_argument("--layers", type=int, help=f"transformer blocks, at most {MAX_LAYERS} (tiny: 2)")
    parser.add_argument("--embd", type=int, help="embedding width (tiny: 64)")
    parser.add_argument("--heads", type=int, help="attention heads; must divide --embd (tiny: 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads; must divide --heads (default: --heads)")
    parser.add_argument("--ff", type=int, help="feed-forward width (tiny: 128)")
    parser.add_argument(
        "--ctx", type=int, help="training context length stored in the file (default: 512; prompt: 8192)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="f16", help="weight type (default: f16)")
    parser.add_argument("--name", default="swapproxy-tiny", help="general.name (default: swapproxy-tiny)")
    template = parser.add_mutually_exclusive_group()
    template.add_argument(
        "--chat-template",
        help="Jinja chat template to store (default: ChatML, replacing any template of the vocab)",
    )
    template.add_argument(
        "--keep-vocab-template",
        action="store_true",
        help="keep the vocab's own tokenizer.chat_template (llama-spm has none)",
    )
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    for field in ("layers", "embd", "heads", "ff"):
        if getattr(args, field) is None:
            setattr(args, field, preset[field])
    if args.ctx is None:
        args.ctx = preset.get("ctx", 512)
    if args.vocab is None:
        args.vocab = args.vocab_dir / preset["vocab"]
    if args.kv_heads is None:
        args.kv_heads = preset.get("kv_heads", args.heads)
    for field in ("layers", "embd", "heads", "kv_heads", "ff", "ctx"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be at least 1, got {getattr(args, field)}")
    if args.layers > MAX_LAYERS:
        parser.error(f"--layers must be at most {MAX_LAYERS} (llama.cpp's LLAMA_MAX_LAYERS), got {args.layers}")
    if args.embd % args.heads:
        parser.error(f"--heads ({args.heads}) must divide --embd ({args.embd})")
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads ({args.kv_heads}) must divide --heads ({args.heads})")
    if not args.vocab.is_file():
        parser.error(
            f"vocab file {args.vocab} does not exist; scripts/build_llama_server.sh --vocab-dir prints the"
            " directory of llama.cpp's ggml-vocab-*.gguf files"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.keep_vocab_template:
        chat_template = None
    else:
        chat_template = args.chat_template if args.chat_template is not None else CHATML_TEMPLATE
    try:
        size = write_model(
            args.vocab,
            args.out,
            layers=args.layers,
            embd=args.embd,
            heads=args.heads,
            kv_heads=args.kv_heads,
            ff=args.ff,
            ctx=args.ctx,
            seed=args.seed,
            dtype=args.dtype,
            chat_template=chat_template,
            name=args.name,
        )
    except VocabError as e:
        print(f"make_tiny_gguf.py: {e}", file=sys.stderr)
        return 1
    print(
        f"make_tiny_gguf.py: wrote {args.out} ({size / 1e6:.1f} MB: {args.layers} layers x {args.embd} embd,"
        f" {args.heads} heads, ff {args.ff}, {args.dtype})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
