"""The project's own small Gemma 4 tokenizer, built offline and deterministically.

The real Gemma 4 tokenizer (262144 entries) cannot be obtained offline, so fixtures ship this one:
a byte-level BPE (``tokenizers``) that carries the Gemma 4 special strings at fixed ids.

Layout (``VOCAB_SIZE`` = 512 ids in all):

* ``0..4``: ``<pad>`` ``<eos>`` ``<bos>`` ``<unk>`` ``<mask>`` (the real Gemma ids).
* ``5..106``: the Gemma 4 control strings at fixed ids (``SPECIAL_TOKENS``), ``<|turn>`` 105 and
  ``<turn|>`` 106 as in the real tokenizer; the tool ids 46..52 follow the ids named in the installed
  transformers/vLLM sources (``<|tool_call>`` 48, ``<tool_call|>`` 49, ``<|tool_response>`` 50). Every
  other id in that range is a filler ``<unusedN>`` (N = id).
* ``107..362``: the 256 byte tokens (GPT-2 byte-to-unicode alphabet), in byte order.
* ``363..511``: BPE merges learned here, deterministically, from ``_CORPUS`` (greedy most-frequent
  pair, ties broken by the pair's strings), so no trainer's tie-breaking can change the vocabulary.

Every id ``0..106`` is a special (added) token: wherever its exact string appears in text it becomes
that single id, and decoding with ``skip_special_tokens=False`` gives the string back. Any other text
goes through the byte-level path, so ``decode(encode(text)) == text`` for every unicode string
(newlines, emoji, lone combining marks, the empty string ...). There is no normaliser and no prefix
space.

BOS: the **chat template owns BOS** (it starts with the literal ``<bos>``); the tokenizer has no
post-processor and never adds BOS or EOS. ``encode(text, add_special_tokens=True)`` and ``=False``
therefore give the same ids, so vLLM's chat prompt ids (template render, then encode) equal
``encode(render(messages))`` whichever flag a caller uses, and BOS can never be doubled. The price: a
raw text prompt (vLLM completions with a string) gets no BOS unless the text carries ``<bos>`` itself.
"""
from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

__all__ = [
    "VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "PAD_ID",
    "EOS_ID",
    "BOS_ID",
    "UNK_ID",
    "MASK_ID",
    "TURN_START_ID",
    "TURN_END_ID",
    "TOOL_RESPONSE_START_ID",
    "GENERATION_EOS_IDS",
    "build_tokenizer",
    "save_tokenizer_files",
]

VOCAB_SIZE = 512

# Fixed ids of every named special string.
SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
}
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
TURN_START_ID, TURN_END_ID = 105, 106
TOOL_RESPONSE_START_ID = 50
# What ends a generation (as in the real generation_config): <eos>, <turn|>, <|tool_response>.
GENERATION_EOS_IDS: list[int] = [EOS_ID, TURN_END_ID, TOOL_RESPONSE_START_ID]

_N_CONTROL = 107  # ids 0..106 are control (added) tokens
_BYTE_OFFSET = _N_CONTROL
_N_MERGES = VOCAB_SIZE - _N_CONTROL - 256

# Small built-in corpus the merges are learned from: chat scaffolding words plus plain English,
# numbers and code-ish text, so common text compresses a little (the merges only need to exist).
_CORPUS = """
system user model thought call declaration response The the of and to in is that for it with as
on was are be this by at from or have an they which one you were her all she there would their we
him been has when who will more no if out so said what up its about into than them can only other
new some could time these two may then do first any my now such like our over man me even most made
after also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great old year
off come since against go came right used take three the model answers the user asks a question
def function(x): return x + 1  # a comment
for i in range(10): print(i, i * 2)
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}
get_weather search_web lookup city unit celsius fahrenheit location query result results value
Let me think step by step. First, I need to find the answer. The answer is 42.
1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 2025 2026 3.14 0.5 -1 true false null
Hello! How can I help you today? Sure, here is the information you asked for.
"""


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """The GPT-2 byte-to-unicode map as a tuple indexed by byte value (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return tuple(mapping[b] for b in range(256))


def _control_tokens() -> list[str]:
    """Strings of ids 0..106: the named specials and ``<unusedN>`` fillers."""
    by_id = {i: s for s, i in SPECIAL_TOKENS.items()}
    return [by_id.get(i, f"<unused{i}>") for i in range(_N_CONTROL)]


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over the byte-level pre-tokenised corpus; ties broken by the pair strings."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS.strip("\n").split("\n"):
        for piece, _ in pre.pre_tokenize_str(line + "\n"):
            words[tuple(piece)] += 1
    merges: list[tuple[str, str]] = []
    word_list = [(list(w), c) for w, c in sorted(words.items())]
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in word_list:
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for symbols, _count in word_list:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [joined]
                else:
                    i += 1
    if len(merges) != n_merges:  # pragma: no cover - the corpus is fixed and large enough
        raise RuntimeError(f"corpus yields only {len(merges)} merges, {n_merges} needed")
    return merges


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    vocab: dict[str, int] = {}
    for i, s in enumerate(_control_tokens()):
        vocab[s] = i
    for b, ch in enumerate(_byte_alphabet()):
        vocab[ch] = _BYTE_OFFSET + b
    merges = _learn_merges(_N_MERGES)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for s in _control_tokens()]
    )
    return tok.to_str(pretty=True)


def build_tokenizer() -> Tokenizer:
    """A fresh ``tokenizers.Tokenizer`` (same bytes every call; see the module docstring)."""
    tok = Tokenizer.from_str(_tokenizer_json())
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:  # pragma: no cover
        raise RuntimeError("tokenizer vocabulary size drifted")
    return tok


def _tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(_control_tokens())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "added_tokens_decoder": added,
    }


def save_tokenizer_files(out_dir: Path | str, chat_template: str) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``chat_template.jinja`` (the file transformers 5 reads the template from; it is not duplicated
    into ``tokenizer_config.json``) into ``out_dir``. Byte-identical output on every call."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": _tokenizer_json() + "\n",
        "tokenizer_config.json": json.dumps(_tokenizer_config(), indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
             "mask_token": "<mask>"},
            indent=2,
            sort_keys=True,
        )
        + "\n",
        "chat_template.jinja": chat_template,
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_bytes(text.encode("utf-8"))
        written.append(path)
    return written
