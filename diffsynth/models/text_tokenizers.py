"""The FLUX.1 prompt tokenizers (CLIP-L byte-level BPE, T5 sentencepiece unigram) without transformers.

Importing transformers costs about 2 s per process, and the pipeline needs nothing from it but two tokenizers.
This module builds them directly on the ``tokenizers`` library (a Rust extension that imports in milliseconds)
from the same folders ``CLIPTokenizerFast.from_pretrained`` / ``T5TokenizerFast.from_pretrained`` read, and
assembles the same pipeline transformers 5 assembles (normalizer, pre-tokenizer, model, post-processor, added
and special tokens, truncation and padding), so the token ids are identical to transformers':

    ids = load_clip_tokenizer(folder)(prompts, max_length=77)
    # == CLIPTokenizerFast.from_pretrained(folder)(prompts, padding="max_length", max_length=77,
    #                                             truncation=True, return_tensors="pt").input_ids

A ``spiece.model`` is read with a small protobuf reader of our own, so neither sentencepiece nor protobuf is
imported either. Nothing here imports transformers.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import struct
import threading
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

__all__ = ["FixedLengthTokenizer", "PromptTokenizer", "load_clip_tokenizer", "load_t5_tokenizer", "VERY_LARGE_INTEGER"]

VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config gives none

# The named special-token slots, in the order transformers keeps them (it adds missing ones in this order).
_NAMED_SLOTS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")

# CLIP's pre-tokenization: the two CLIP markers, English contractions, letter runs, single digits, and runs of
# anything else that is neither a letter, a digit nor whitespace (whitespace itself is dropped).
_CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_CLIP_DEFAULTS = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_T5_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
_T5_UNK_ID = 2  # transformers' T5 tokenizer fixes the unigram unk id (pad 0, eos 1, unk 2)


# --------------------------------------------------------------------------------------
# The tokenizer object
# --------------------------------------------------------------------------------------


class FixedLengthTokenizer:
    """A `tokenizers` backend with transformers' pad/truncation settings: texts encoded to a fixed length, as
    transformers' ``padding="max_length", truncation=True`` encodes them. PromptTokenizer and ChatTokenizer build
    on it."""

    pad_token_id: int | None  # None only when the config names no usable padding token (then calls raise)
    model_max_length: int

    def __init__(self, backend: Tokenizer, *, pad_token: str | None, pad_token_id: int | None, model_max_length: int,
                 padding_side: str = "right", truncation_side: str = "right", name: str = "") -> None:
        self.backend = backend
        self.pad_token = pad_token
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.name = name
        self._lock = threading.Lock()  # truncation/padding are settings of the shared backend

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_length: int, add_special_tokens: bool = True) -> list:
        """The encodings of `texts`: padded with the pad token on the padding side, truncated on the truncation
        side, keeping room for the special tokens the post-processor adds. A max_length below their count is an
        error (transformers would then skip truncation and return rows longer than max_length)."""
        if isinstance(texts, str):
            raise TypeError(f"{type(self).__name__} takes a list of texts, not a single string")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("every text must be a str")
        if isinstance(max_length, bool) or int(max_length) != max_length:
            raise TypeError(f"max_length must be an int, got {max_length!r}")
        max_length = int(max_length)
        specials = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_length < max(specials, 1):
            raise ValueError(f"max_length must be at least {max(specials, 1)}"
                             f"{' (the special tokens)' if specials else ''}, got {max_length}")
        if self.pad_token is None or self.pad_token_id is None or self.pad_token_id < 0:
            raise ValueError(f"the tokenizer in {self.name!r} has no padding token, so it cannot pad to max_length")
        if not texts:
            return []
        truncation = {"max_length": max_length, "stride": 0, "strategy": "longest_first",
                      "direction": self.truncation_side}
        padding = {"length": max_length, "direction": self.padding_side, "pad_id": self.pad_token_id,
                   "pad_token": self.pad_token, "pad_type_id": 0, "pad_to_multiple_of": None}
        backend = self.backend
        with self._lock:
            current = backend.truncation
            if current is None or any(current.get(k) != v for k, v in truncation.items()):
                backend.enable_truncation(**truncation)
            if backend.padding != padding:
                backend.enable_padding(**padding)
            return backend.encode_batch(texts, add_special_tokens=bool(add_special_tokens))

    def ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The token ids of one text, neither padded nor truncated (transformers' ``tokenizer(text).input_ids``)."""
        if not isinstance(text, str):
            raise TypeError(f"ids takes one text (str), got {type(text).__name__}")
        with self._lock:
            self.backend.no_truncation()
            self.backend.no_padding()
            return self.backend.encode(text, add_special_tokens=bool(add_special_tokens)).ids


class PromptTokenizer(FixedLengthTokenizer):
    """A prompt -> token-id tokenizer: pads/truncates a batch of prompts to a fixed length.

    ``tokenizer(prompts, max_length)`` equals transformers' ``tokenizer(list(prompts), padding="max_length",
    max_length=max_length, truncation=True, return_tensors="pt").input_ids`` for the same folder. Truncation
    keeps room for the special tokens the post-processor adds (CLIP: BOS + EOS, T5: ``</s>``); a max_length
    below their count is an error (transformers would not truncate at all then).
    """

    eos_token_id: int

    def __init__(self, backend: Tokenizer, *, eos_token_id: int, **settings) -> None:
        super().__init__(backend, **settings)
        self.eos_token_id = eos_token_id

    def __repr__(self) -> str:
        return (f"PromptTokenizer({self.name!r}, vocab={len(self)}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, model_max_length={self.model_max_length})")

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        """Token ids ``(len(prompts), max_length)`` (int64), padded with ``pad_token_id`` and truncated."""
        encodings = self.encode(prompts, max_length)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(encodings), int(max_length))


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _check_folder(path: str | Path, alternatives: list[list[str]], what: str) -> Path:
    folder = Path(path)
    if any(all((folder / name).is_file() for name in files) for files in alternatives):
        return folder
    expected = " or ".join(" + ".join(files) for files in alternatives)
    state = "is missing" if not folder.is_dir() else "lacks the tokenizer files"
    raise FileNotFoundError(f"{what} folder {str(folder)!r} {state}: expected {expected}")


def corrupt_file(path: Path, what: str, reason: object) -> ValueError:
    return ValueError(f"{what} file {str(path)!r} is corrupt: {reason}")


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while a vocabulary's ~10^5 small (acyclic) objects are made: with torch
    imported, the collections it would trigger cost more than the parsing itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_json(path: Path, what: str, kind: type = dict) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt_file(path, what, f"not valid JSON ({e})") from e
    if not isinstance(data, kind):
        raise corrupt_file(path, what, f"expected a JSON {kind.__name__}, found {type(data).__name__}")
    return data


def _read_optional_json(folder: Path, name: str, what: str) -> dict | None:
    path = folder / name
    return read_json(path, what) if path.is_file() else None


def read_bpe_vocab_files(folder: Path, what: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json (token -> id) and merges.txt, parsed the way the tokenizers library parses them."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab = read_json(vocab_path, what)
    for token, index in vocab.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**32:
            raise corrupt_file(vocab_path, what, f"token {token!r} has id {index!r}, expected a non-negative integer")
    try:
        text = merges_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise corrupt_file(merges_path, what, f"not UTF-8 text ({e})") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    merges: list[tuple[str, str]] = []
    for line in lines:
        line = line[:-1] if line.endswith("\r") else line
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise corrupt_file(merges_path, what, f"merge {len(merges) + 1} ({line[:60]!r}) is not two space-separated tokens")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def bpe_from_tokenizer_json(tokenizer_json: dict, path: Path, what: str) -> tuple[dict[str, int], list[tuple]]:
    """A tokenizer.json's BPE vocabulary (a mapping, or a list of tokens / [token, score] in id order) and merges
    ("a b" strings or [a, b] pairs)."""
    model = tokenizer_json["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        vocab = {item[0] if isinstance(item, list) else item: i for i, item in enumerate(vocab)}
    if not isinstance(vocab, dict):
        raise corrupt_file(path, what, "model.vocab is neither a mapping nor a list")
    raw_merges = model.get("merges") or []
    if not isinstance(raw_merges, list):
        raise corrupt_file(path, what, "model.merges is not a list")
    return vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]


def _pb_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _pb_next(buf: bytes, pos: int) -> tuple[int, int, int | bytes, int]:
    """The protobuf field at `pos`: (field number, wire type, value, next position); value: int for a varint,
    bytes otherwise."""
    end = len(buf)
    key, pos = _pb_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise ValueError("field number 0")
    if wire == 0:
        value, pos = _pb_varint(buf, pos)
        return field, wire, value, pos
    if wire == 1 or wire == 5:
        size = 8 if wire == 1 else 4
    elif wire == 2:
        size, pos = _pb_varint(buf, pos)
    else:
        raise ValueError(f"unsupported wire type {wire}")
    if pos + size > end:
        raise ValueError("field runs past the end of the data")
    return field, wire, buf[pos:pos + size], pos + size


def _pb_fields(buf: bytes):
    """(field number, wire type, value) of every field of a protobuf message."""
    pos = 0
    while pos < len(buf):
        field, wire, value, pos = _pb_next(buf, pos)
        yield field, wire, value


_F32 = struct.Struct("<f").unpack_from


def _spiece_piece(msg: bytes, index: int) -> tuple[str, float, int]:
    """One ModelProto.SentencePiece: (piece: field 1, score: field 2, type: field 3, NORMAL=1 by default)."""
    n = len(msg)
    # fast path, sentencepiece's own layout: piece (short), score, then type unless NORMAL
    if n >= 7 and msg[0] == 0x0A and msg[1] < 0x80:
        end = 2 + msg[1]
        if end + 5 <= n and msg[end] == 0x15:
            if end + 5 == n:
                return msg[2:end].decode("utf-8"), _F32(msg, end + 1)[0], 1
            if end + 7 == n and msg[end + 5] == 0x18 and msg[end + 6] < 0x80:
                return msg[2:end].decode("utf-8"), _F32(msg, end + 1)[0], msg[end + 6]
    piece, score, kind = None, 0.0, 1
    for f, w, v in _pb_fields(msg):
        if f == 1 and w == 2:
            piece = v.decode("utf-8")
        elif f == 2 and w == 5:
            score = _F32(v)[0]
        elif f == 3 and w == 0:
            kind = v
        elif f in (1, 2, 3):
            raise ValueError(f"piece {index} field {f} has wire type {w}")
    if piece is None:
        raise ValueError(f"piece {index} has no text")
    return piece, score, kind


def _read_spiece(path: Path, what: str) -> tuple[list[tuple[str, float, int]], bytes]:
    """A sentencepiece ModelProto: its pieces as (piece, score, type) and the precompiled normalizer charsmap.

    Reads only what the T5 tokenizer needs: ``pieces`` (field 1) and ``normalizer_spec.precompiled_charsmap``
    (field 3 -> 2); other fields are skipped.
    """
    data = path.read_bytes()
    pieces: list[tuple[str, float, int]] = []
    charsmap = b""
    try:
        pos, end = 0, len(data)
        while pos < end:
            if data[pos] == 0x0A and pos + 1 < end and data[pos + 1] < 0x80:  # a piece shorter than 128 bytes
                start = pos + 2
                pos = start + data[pos + 1]
                if pos > end:
                    raise ValueError("field runs past the end of the data")
                pieces.append(_spiece_piece(data[start:pos], len(pieces)))
                continue
            field, wire, value, pos = _pb_next(data, pos)
            if field in (1, 2, 3, 4, 5) and wire != 2:
                raise ValueError(f"field {field} has wire type {wire}, expected a message")
            if field == 1:
                pieces.append(_spiece_piece(value, len(pieces)))
            elif field == 3:
                for f, w, v in _pb_fields(value):
                    if f == 2 and w == 2:
                        charsmap = v
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt_file(path, what, f"not a sentencepiece model ({e})") from e
    if not pieces:
        raise corrupt_file(path, what, "not a sentencepiece model (no pieces)")
    return pieces, charsmap


# --------------------------------------------------------------------------------------
# Special and added tokens, resolved the way transformers 5 resolves them
# --------------------------------------------------------------------------------------


def _added_token(entry: dict, source: Path, what: str, special: bool | None = None) -> AddedToken:
    fields = {k: v for k, v in entry.items() if k not in ("__type", "id")}
    if special is not None:
        fields["special"] = special
    unknown = set(fields) - set(_ADDED_TOKEN_FIELDS)
    if unknown or not isinstance(fields.get("content"), str):
        raise corrupt_file(source, what, f"bad added-token entry {entry!r}")
    return AddedToken(**fields)


def _convert_typed(obj: Any, source: Path, what: str) -> Any:
    """Config values serialized as ``{"__type": "AddedToken", ...}`` -> AddedToken (recursively)."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return _added_token(obj, source, what)
    if isinstance(obj, (list, tuple)):
        return [_convert_typed(o, source, what) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_typed(v, source, what) for k, v in obj.items()}
    return obj


def _saved_added_tokens(saved: Any, config_path: Path, what: str) -> dict[int, AddedToken]:
    """tokenizer_config.json's `added_tokens_decoder` (id -> added token), as transformers 4.33+ saves it."""
    if not isinstance(saved, dict):
        raise corrupt_file(config_path, what, "added_tokens_decoder is not a mapping")
    out: dict[int, AddedToken] = {}
    for index, entry in saved.items():
        if not isinstance(entry, dict):
            raise corrupt_file(config_path, what, f"added_tokens_decoder[{index!r}] is not a mapping")
        try:
            number = int(index)
        except ValueError as e:
            raise corrupt_file(config_path, what, f"added_tokens_decoder key {index!r} is not an id") from e
        out[number] = _added_token(entry, config_path, what)
    return out


def _legacy_added_tokens(folder: Path, init: dict, model_specific: dict, what: str,
                         tokenizer_json: dict | None) -> dict[int, AddedToken]:
    """Without `added_tokens_decoder` (older folders): special_tokens_map.json merged into `init` (in place; its
    model-specific tokens into `model_specific`), then added_tokens.json and tokenizer.json's added tokens."""
    map_path = folder / "special_tokens_map.json"
    for key, value in (_read_optional_json(folder, "special_tokens_map.json", what) or {}).items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            value = _added_token(value, map_path, what, special=True)
        elif key == "extra_special_tokens" and isinstance(value, list):
            merged = list(init.get("extra_special_tokens") or [])
            for token in value:
                token = _added_token(token, map_path, what, special=True) if isinstance(token, dict) else token
                if token not in merged:
                    merged.append(token)
            value = merged
        elif isinstance(value, list):  # additional_special_tokens, entries possibly serialized AddedTokens
            value = [_added_token(t, map_path, what, special=True) if isinstance(t, dict) else t for t in value]
        init[key] = value
    if isinstance(init.get("extra_special_tokens"), dict):
        model_specific.update(init.pop("extra_special_tokens"))
    out: dict[int, AddedToken] = {}
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        specials = {str(init[k]) for k in _NAMED_SLOTS if init.get(k)}
        specials.update(str(t) for t in (init.get("extra_special_tokens") or []))
        for content, index in read_json(added_path, what).items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise corrupt_file(added_path, what, f"token {content!r} has id {index!r}")
            special = content in specials
            out[int(index)] = AddedToken(content, rstrip=False, lstrip=False, normalized=not special, special=special)
    for entry in (tokenizer_json or {}).get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise corrupt_file(folder / "tokenizer.json", what, f"bad added-token entry {entry!r}")
        out[entry["id"]] = _added_token(entry, folder / "tokenizer.json", what)
    return out


class TokenSetup:
    """The tokenizer_config / special_tokens_map / tokenizer.json settings a transformers tokenizer starts from.

    ``init`` is what transformers passes to the tokenizer class as keyword arguments (config keys, with the legacy
    special_tokens_map.json merged in); ``added_decoder`` the saved added tokens by id.
    """

    def __init__(self, folder: Path, what: str, tokenizer_json: dict | None) -> None:
        config_path = folder / "tokenizer_config.json"
        init: dict[str, Any] = dict(_read_optional_json(folder, "tokenizer_config.json", what) or {})
        init.pop("tokenizer_class", None)
        init.pop("init_inputs", None)
        if tokenizer_json is not None:
            init.pop("add_bos_token", None)
            init.pop("add_eos_token", None)
        if "additional_special_tokens" in init and not init.get("extra_special_tokens"):
            init["extra_special_tokens"] = init.pop("additional_special_tokens")
        model_specific = {
            key: init.pop(key) for key in list(init)
            if key not in _NAMED_SLOTS and key.endswith("_token") and isinstance(init[key], str)
        }
        if isinstance(init.get("extra_special_tokens"), dict):
            model_specific.update(init.pop("extra_special_tokens"))

        if "added_tokens_decoder" in init:
            added_decoder = _saved_added_tokens(init.pop("added_tokens_decoder"), config_path, what)
        else:
            added_decoder = _legacy_added_tokens(folder, init, model_specific, what, tokenizer_json)
        added_by_content = {token.content: token for token in added_decoder.values()}

        init = _convert_typed(init, config_path, what)
        model_specific = _convert_typed(model_specific, config_path, what)
        for key in _NAMED_SLOTS:
            if init.get(key) is not None and added_by_content:
                init[key] = added_by_content.get(str(init[key]), init[key])

        self.init = init
        self.model_specific: dict[str, Any] = model_specific
        self.added_decoder = added_decoder

    def tokens_to_add(self, named: dict[str, Any], extra: Any) -> tuple[list[AddedToken], dict[str, Any]]:
        """The added tokens transformers registers with the backend, in its order, and the named special tokens.

        `named`: the values the tokenizer class passes for the named slots; `extra`: its extra special tokens.
        """
        slots: dict[str, Any] = {key: None for key in _NAMED_SLOTS}
        for key in _NAMED_SLOTS:
            if key in named:
                slots[key] = named[key]
            elif self.init.get(key) is not None:
                slots[key] = self.init[key]
        auto_specific = {
            key: value for key, value in self.init.items()
            if key not in _NAMED_SLOTS and key.endswith("_token") and isinstance(value, (str, AddedToken))
        }
        slots.update({**auto_specific, **self.model_specific})
        extras: list = []
        if isinstance(extra, dict):
            slots.update(extra)
        elif isinstance(extra, (list, tuple)):
            extras = list(extra)

        tokens: list = [token for _, token in sorted(self.added_decoder.items(), key=lambda item: item[0])]
        encoder = [str(token) for token in tokens]
        for value in [*slots.values(), *extras]:
            if value is None:
                continue
            if str(value) not in encoder and value not in tokens:
                tokens.append(value)
        named_contents = [str(value) for value in slots.values() if value]
        out: list[AddedToken] = []
        for token in tokens:
            if isinstance(token, str):
                token = AddedToken(token, special=True)
            elif not token.special and str(token) in named_contents:
                state = token.__getstate__()
                token = AddedToken(**{k: state[k] for k in _ADDED_TOKEN_FIELDS if k != "special"}, special=True)
            out.append(token)
        return out, slots

    def sides(self, tokenizer_json: dict | None, what: str, path: Path) -> tuple[str, str]:
        """(padding side, truncation side): the config's, else tokenizer.json's, else "right"."""
        padding_side, truncation_side = self.init.get("padding_side"), self.init.get("truncation_side")
        if tokenizer_json is not None:
            if padding_side is None and isinstance(tokenizer_json.get("padding"), dict):
                padding_side = str(tokenizer_json["padding"].get("direction", "right")).lower()
            if truncation_side is None and isinstance(tokenizer_json.get("truncation"), dict):
                truncation_side = str(tokenizer_json["truncation"].get("direction", "right")).lower()
        padding_side, truncation_side = padding_side or "right", truncation_side or "right"
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise corrupt_file(path, what, f"{name} must be 'right' or 'left', got {side!r}")
        return padding_side, truncation_side

    def model_max_length(self) -> int:
        max_len = self.init.get("max_len")
        value = self.init["model_max_length"] if "model_max_length" in self.init else max_len
        return value if value is not None else VERY_LARGE_INTEGER


def token_id(backend: Tokenizer, token: Any, unk: Any) -> int | None:
    """transformers' convert_tokens_to_ids: the id of `token`, else the unknown token's id."""
    if token is None:
        return None
    index = backend.token_to_id(str(token))
    if index is None and unk is not None:
        index = backend.token_to_id(str(unk))
    return index


def register_added_tokens(backend: Tokenizer, setup: TokenSetup, named: dict[str, Any], extra: Any, folder: Path,
            what: str, tokenizer_json: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Register the added tokens; return the named special tokens and the PromptTokenizer settings."""
    tokens, slots = setup.tokens_to_add(named, extra)
    if tokens:
        backend.add_tokens(tokens)
    backend.encode_special_tokens = bool(setup.init.get("split_special_tokens", False))
    padding_side, truncation_side = setup.sides(tokenizer_json, what, folder / "tokenizer_config.json")
    unk = slots.get("unk_token")
    settings = dict(
        eos_token_id=token_id(backend, slots.get("eos_token"), unk),
        pad_token=None if slots.get("pad_token") is None else str(slots["pad_token"]),
        pad_token_id=token_id(backend, slots.get("pad_token"), unk),
        model_max_length=setup.model_max_length(),
        padding_side=padding_side,
        truncation_side=truncation_side,
        name=str(folder),
    )
    return slots, settings


def load_tokenizer_json(folder: Path, what: str) -> dict | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = read_json(path, what)
    if not isinstance(data.get("model"), dict):
        raise corrupt_file(path, what, "no 'model' section")
    return data


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


def load_clip_tokenizer(path: str | Path) -> PromptTokenizer:
    """CLIP-L's byte-level BPE tokenizer from a folder with vocab.json + merges.txt, or tokenizer.json.

    Same pipeline as transformers 5's CLIPTokenizer: NFC, whitespace runs -> one space, lower case; split into
    CLIP markers / contractions / letter runs / digits / other-symbol runs, byte-level alphabet; BPE with the
    ``</w>`` end-of-word suffix; ``<|startoftext|> ... <|endoftext|>`` around every prompt. With a tokenizer.json,
    only its vocabulary, merges and (when the config saves none) added tokens are used, as transformers does.
    """
    with gc_paused():
        return _load_clip(path)


def _load_clip(path: str | Path) -> PromptTokenizer:
    what = "CLIP tokenizer"
    folder = _check_folder(path, [["vocab.json", "merges.txt"], ["tokenizer.json"]], what)
    tokenizer_json = load_tokenizer_json(folder, what)
    if tokenizer_json is not None:
        json_path = folder / "tokenizer.json"
        vocab, merges = bpe_from_tokenizer_json(tokenizer_json, json_path, what)
        files = f"file {str(json_path)!r} is"
    else:
        vocab, merges = read_bpe_vocab_files(folder, what)
        files = f"files {str(folder / 'vocab.json')!r} / {str(folder / 'merges.txt')!r} are"
    setup = TokenSetup(folder, what, tokenizer_json)
    init = setup.init
    named = {key: init[key] if key in init else default for key, default in _CLIP_DEFAULTS.items()}
    try:
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=str(named["unk_token"])))
    except Exception as e:  # the tokenizers library rejects the vocabulary or merges (e.g. an unknown merge token)
        raise ValueError(f"{what} {files} corrupt: {e}") from e
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    extra = init["extra_special_tokens"] if "extra_special_tokens" in init else init.get("additional_special_tokens")
    slots, settings = register_added_tokens(backend, setup, named, extra, folder, what, tokenizer_json)
    unk = slots.get("unk_token")
    bos, eos = slots.get("bos_token"), slots.get("eos_token")
    bos_id, eos_id = token_id(backend, bos, unk), token_id(backend, eos, unk)
    if bos_id is None or eos_id is None:
        raise ValueError(f"{what} in {str(folder)!r}: BOS {str(bos)!r} / EOS {str(eos)!r} are not in the vocabulary")
    backend.post_processor = processors.RobertaProcessing((str(eos), eos_id), (str(bos), bos_id),
                                                          trim_offsets=False, add_prefix_space=False)
    return PromptTokenizer(backend, **settings)


# --------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------


def _precompiled_from_json(tokenizer_json: dict, path: Path, what: str) -> bytes | None:
    """The sentencepiece charsmap of a tokenizer.json's Precompiled normalizer (top level or in a Sequence)."""
    spec = tokenizer_json.get("normalizer")
    if not spec:
        return None
    if isinstance(spec, dict) and spec.get("type") == "Sequence":
        spec = spec.get("normalizers") or []
    elif not isinstance(spec, list):
        spec = [spec]
    for item in spec:
        if isinstance(item, dict) and item.get("type") == "Precompiled" and "precompiled_charsmap" in item:
            try:
                return base64.b64decode(item["precompiled_charsmap"] or "")
            except (ValueError, TypeError) as e:
                raise corrupt_file(path, what, f"bad precompiled_charsmap ({e})") from e
    return None


def load_t5_tokenizer(path: str | Path) -> PromptTokenizer:
    """T5's sentencepiece unigram tokenizer from a folder with tokenizer.json and/or spiece.model.

    Same pipeline as transformers 5's T5Tokenizer: the sentencepiece precompiled normalizer (when the model has
    one); split on whitespace, ``▁`` prefixed to every word (transformers 5 ignores ``legacy`` and
    ``add_prefix_space`` here); unigram over the pieces with unk id 2 and no byte fallback; ``</s>`` after
    every prompt; ``<pad>``, ``</s>``, ``<unk>`` and the ``<extra_id_N>`` sentinels as special tokens, matched
    whole in the raw prompt. tokenizer.json, when present, wins over spiece.model; from spiece.model the
    sentinels get ids ``len(pieces) + extra_ids - 1 - N``.
    """
    with gc_paused():
        return _load_t5(path)


def _t5_vocabulary(folder: Path, tokenizer_json: dict | None, init: dict, extra_ids: int,
                   what: str) -> tuple[list[tuple[str, float]], bytes | None, list | None, str]:
    """(unigram pieces with scores, precompiled charsmap, additional special tokens, the file read) from
    tokenizer.json when there is one, else from spiece.model (its sentinels appended, its control pieces special)."""
    if tokenizer_json is not None:
        json_path = folder / "tokenizer.json"
        raw_vocab = tokenizer_json["model"].get("vocab")
        try:
            if not (isinstance(raw_vocab, list) and raw_vocab and isinstance(raw_vocab[0], list)):
                raise TypeError
            vocab = [(piece, score) for piece, score in raw_vocab]  # the tokenizers library checks the types
        except (TypeError, ValueError):
            raise corrupt_file(json_path, what, "model.vocab is not a unigram vocabulary ([piece, score] pairs)") from None
        return vocab, _precompiled_from_json(tokenizer_json, json_path, what), \
            init.get("additional_special_tokens"), str(json_path)
    spiece_path = folder / "spiece.model"
    pieces, charsmap = _read_spiece(spiece_path, what)
    vocab = [(piece, score) for piece, score, _ in pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    # sentencepiece control pieces (type 3: <pad>, </s>, ...) are special tokens
    additional = [AddedToken(piece, normalized=False, special=True) for piece, _, kind in pieces if kind == 3]
    return vocab, charsmap or None, additional, str(spiece_path)


def _load_t5(path: str | Path) -> PromptTokenizer:
    what = "T5 tokenizer"
    folder = _check_folder(path, [["spiece.model"], ["tokenizer.json"]], what)
    tokenizer_json = load_tokenizer_json(folder, what)
    setup = TokenSetup(folder, what, tokenizer_json)
    init = setup.init
    extra_ids = init.get("extra_ids", 100)
    if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
        raise corrupt_file(folder / "tokenizer_config.json", what, f"extra_ids must be a non-negative int, got {extra_ids!r}")
    vocab, charsmap, additional, source = _t5_vocabulary(folder, tokenizer_json, init, extra_ids, what)
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    if additional is not None:
        additional = list(additional)
        present = [token for token in additional if "<extra_id_" in str(token)]
        if not present:
            additional += sentinels
        elif extra_ids > 0 and extra_ids != len(present):
            raise ValueError(
                f"{what} in {str(folder)!r}: extra_ids ({extra_ids}) does not match the {len(present)} "
                "<extra_id_N> tokens among additional_special_tokens"
            )
    else:
        additional = sentinels
    extra = init["extra_special_tokens"] if "extra_special_tokens" in init else additional

    named = {key: init[key] if key in init else default for key, default in _T5_DEFAULTS.items()}
    try:
        backend = Tokenizer(Unigram(vocab, _T5_UNK_ID, False))
        if charsmap is not None:
            backend.normalizer = normalizers.Precompiled(charsmap)
    except Exception as e:  # the tokenizers library rejects the vocabulary or the charsmap
        raise ValueError(f"{what} file {source!r} is corrupt: {e}") from e
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    slots, settings = register_added_tokens(backend, setup, named, extra, folder, what, tokenizer_json)
    eos_id = settings["eos_token_id"]
    if eos_id is None:
        raise ValueError(f"{what} in {str(folder)!r}: EOS {str(slots.get('eos_token'))!r} is not in the vocabulary")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)]
    )
    return PromptTokenizer(backend, **settings)
