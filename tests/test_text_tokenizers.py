"""diffsynth.models.text_tokenizers against transformers' fast tokenizers (the oracle), on tokenizer folders from
the project's builders (diffsynth.nano.text) and release-style variants of them: with a tokenizer.json, with
transformers-4-style configs (added_tokens_decoder, AddedToken dicts), legacy True/False, no config at all, a
sentencepiece model with byte pieces and user-defined / control symbols."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from diffsynth.models.text_tokenizers import VERY_LARGE_INTEGER, PromptTokenizer, load_clip_tokenizer, load_t5_tokenizer
from diffsynth.nano.text import random_sentences, write_clip_tokenizer, write_t5_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO Of A Red CAT under the Moon",
    "zebra xylophone quixotic",  # out of vocabulary
    "ﬁne Å Ångström café naïve ＦＵＬＬ ｗｉｄｔｈ ① ² Ⅻ",  # ligature, accents, NFKC cases
    "cafe\u0301 A\u030a decomposed accents",  # NFC composes them
    "emoji 🐱🔥 cat 👩‍🚀",
    "一只猫 日本語のテキスト",
    "tabs\tand\nnewlines\r\n  and   many    spaces",
    "   leading and trailing   ",
    "!!!...???,,;; -- ... ((()))",
    "digits 12345 3.14 2024-01-01",
    "it's don't I'M we'll they've you'd",
    "a </s> b",
    "x<extra_id_3>y <extra_id_0> start",
    "<|endoftext|> mid <|startoftext|> end",
    "A <|STARTOFTEXT|> b <|EndOfText|>",
    "<pad><unk></s> <sep> <ctrl> cat dog",
    "▁ underscore ▁▁ x",
    "\u00a0nbsp\u2003em\u200bzero-width",
    "<|pad|> newword NEWWORD",
    " ".join(["red cat sitting on a wooden table"] * 80),  # longer than every max_length
    "x",
]
MAX_LENGTHS = (8, 16, 77, 512)


# --------------------------------------------------------------------------------------
# Folder variants
# --------------------------------------------------------------------------------------


def _save_with_tokenizer_json(src: Path, dst: Path, cls) -> None:
    """Copy of `src` plus the tokenizer.json (and configs) transformers' save_pretrained writes."""
    shutil.copytree(src, dst)
    cls.from_pretrained(str(src), local_files_only=True).save_pretrained(str(dst))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _clip_release(folder: Path) -> None:
    """The FLUX.1 release's tokenizer/ layout: added_tokens_decoder, BOS matched on normalized text."""
    write_clip_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    flags = dict(lstrip=False, rstrip=False, single_word=False, special=True)
    edit_json(folder / "tokenizer_config.json", added_tokens_decoder={
        str(vocab["<|startoftext|>"]): {"content": "<|startoftext|>", "normalized": True, **flags},
        str(vocab["<|endoftext|>"]): {"content": "<|endoftext|>", "normalized": False, **flags},
    }, clean_up_tokenization_spaces=True)


def _clip_openai(folder: Path) -> None:
    """openai/clip-vit-large-patch14's older layout: special tokens as serialized AddedToken dicts."""
    write_clip_tokenizer(folder)

    def token(content, typed):
        entry = dict(content=content, single_word=False, lstrip=False, rstrip=False, normalized=True)
        return {**entry, "__type": "AddedToken"} if typed else entry

    config = {"unk_token": token("<|endoftext|>", True), "bos_token": token("<|startoftext|>", True),
              "eos_token": token("<|endoftext|>", True), "pad_token": "<|endoftext|>", "add_prefix_space": False,
              "errors": "replace", "do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": token("<|startoftext|>", False), "eos_token": token("<|endoftext|>", False),
               "unk_token": token("<|endoftext|>", False), "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def _clip_json_added(folder: Path, tmp: Path) -> None:
    """tokenizer.json with two extra added tokens (one special, one normalized word) and no saved decoder."""
    _save_with_tokenizer_json(_build("clip", tmp), folder, transformers.CLIPTokenizerFast)
    data = json.loads((folder / "tokenizer.json").read_text())
    top = max(t["id"] for t in data["added_tokens"])
    base = dict(single_word=False, lstrip=False, rstrip=False)
    data["added_tokens"] += [
        {"id": top + 1, "content": "<|pad|>", **base, "normalized": False, "special": True},
        {"id": top + 2, "content": "newword", **base, "normalized": True, "special": False},
    ]
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _t5_release(folder: Path, tmp: Path) -> None:
    """The FLUX.1 release's tokenizer_2/ layout: a transformers-4 tokenizer.json (its own normalizer and
    pre-tokenizer, which transformers 5 ignores), added_tokens_decoder, AddedToken dicts in special_tokens_map."""
    _save_with_tokenizer_json(_build("t5", tmp), folder, transformers.T5TokenizerFast)
    data = json.loads((folder / "tokenizer.json").read_text())
    charsmap = data["normalizer"]["precompiled_charsmap"]
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": charsmap},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
    ]}
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    decoder = {str(t["id"]): {"content": t["content"], **flags} for t in data["added_tokens"]}
    extra = [f"<extra_id_{i}>" for i in range(100)]
    config = {"added_tokens_decoder": decoder, "additional_special_tokens": extra, "clean_up_tokenization_spaces": True,
              "eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
              "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {name: {"content": content, **{k: v for k, v in flags.items() if k != "special"}}
               for name, content in (("eos_token", "</s>"), ("pad_token", "<pad>"), ("unk_token", "<unk>"))}
    (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": extra, **special}))


def _t5_byte_fallback(folder: Path) -> None:
    """A sentencepiece model with byte pieces, user-defined and control symbols (transformers' T5 ignores the
    byte fallback: unknown characters become <unk>)."""
    import sentencepiece as spm

    sentences = random_sentences(1500) + ["café naïve résumé Ångström", "一只猫在花园里", "emoji 🐱 fun"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram", vocab_size=400, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", num_threads=1,
        character_coverage=1.0, shuffle_input_sentence=False, minloglevel=2, byte_fallback=True,
        user_defined_symbols=["<sep>", "cat dog"], control_symbols=["<ctrl>"],
    )
    write_t5_tokenizer(folder)
    (folder / "spiece.model").write_bytes(buf.getvalue())


_INTL = tuple(random_sentences(1500)) + ("café naïve résumé Ångström über", "一只猫在花园里 日本語", "it's don't won't") * 30


def _build(name: str, tmp: Path) -> Path:
    folder = tmp / name
    if folder.exists():
        return folder
    if name == "clip":
        write_clip_tokenizer(folder)
    elif name == "clip_words":
        write_clip_tokenizer(folder, words=("photo", "cat", "caf", "don", "'t", "'s", "!!!", "...", "zebra"))
    elif name == "clip_json":
        _save_with_tokenizer_json(_build("clip", tmp), folder, transformers.CLIPTokenizerFast)
    elif name == "clip_json_only":
        shutil.copytree(_build("clip_json", tmp), folder)
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
    elif name == "clip_release":
        _clip_release(folder)
    elif name == "clip_openai":
        _clip_openai(folder)
    elif name == "clip_json_added":
        _clip_json_added(folder, tmp)
    elif name == "clip_json_sides":  # padding and truncation saved in tokenizer.json: transformers takes the sides
        shutil.copytree(_build("clip_json", tmp), folder)
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        backend.enable_padding(direction="left", pad_id=0, pad_token="<|endoftext|>")
        backend.enable_truncation(20, direction="left")
        backend.save(str(folder / "tokenizer.json"))
    elif name == "clip_bare":
        write_clip_tokenizer(folder)
        (folder / "tokenizer_config.json").unlink()
        (folder / "special_tokens_map.json").unlink()
    elif name == "t5":
        write_t5_tokenizer(folder)
    elif name == "t5_legacy_false":
        write_t5_tokenizer(folder)
        edit_json(folder / "tokenizer_config.json", legacy=False, add_prefix_space=False)
    elif name == "t5_sides":
        write_t5_tokenizer(folder)
        edit_json(folder / "tokenizer_config.json", padding_side="left", truncation_side="left")
    elif name == "t5_json":
        _save_with_tokenizer_json(_build("t5", tmp), folder, transformers.T5TokenizerFast)
    elif name == "t5_json_legacy_false":
        _save_with_tokenizer_json(_build("t5_legacy_false", tmp), folder, transformers.T5TokenizerFast)
        edit_json(folder / "tokenizer_config.json", legacy=False)
    elif name == "t5_json_only":
        shutil.copytree(_build("t5_json", tmp), folder)
        (folder / "spiece.model").unlink()
    elif name == "t5_release":
        _t5_release(folder, tmp)
    elif name == "t5_intl":
        write_t5_tokenizer(folder, sentences=_INTL, max_length=77)
    elif name == "t5_byte_fallback":
        _t5_byte_fallback(folder)
    elif name == "t5_bare":
        write_t5_tokenizer(folder)
        (folder / "tokenizer_config.json").unlink()
        (folder / "special_tokens_map.json").unlink()
    else:
        raise KeyError(name)
    return folder


@pytest.fixture(scope="module")
def tok_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_tokenizers")


def _oracle(folder: Path):
    cls = transformers.CLIPTokenizerFast if folder.name.startswith("clip") else transformers.T5TokenizerFast
    return cls.from_pretrained(str(folder), local_files_only=True)


def _ours(folder: Path) -> PromptTokenizer:
    return (load_clip_tokenizer if folder.name.startswith("clip") else load_t5_tokenizer)(folder)


def _reference_ids(oracle, prompts: list[str], max_length: int) -> torch.Tensor:
    return oracle(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="pt").input_ids


VARIANTS = ["clip", "clip_words", "clip_json", "clip_json_only", "clip_release", "clip_openai", "clip_json_added",
            "clip_json_sides", "clip_bare", "t5", "t5_legacy_false", "t5_sides", "t5_json", "t5_json_legacy_false",
            "t5_json_only", "t5_release", "t5_intl", "t5_byte_fallback", "t5_bare"]


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_ids_match_transformers(tok_root, variant):
    folder = _build(variant, tok_root)
    ours, oracle = _ours(folder), _oracle(folder)
    assert ours.eos_token_id == oracle.eos_token_id
    assert ours.pad_token_id == oracle.pad_token_id
    assert ours.model_max_length == oracle.model_max_length
    assert len(ours) == len(oracle)
    for max_length in MAX_LENGTHS:
        got, want = ours(PROMPTS, max_length), _reference_ids(oracle, PROMPTS, max_length)
        assert got.dtype == torch.long and got.shape == (len(PROMPTS), max_length)
        bad = [p[:40] for p, a, b in zip(PROMPTS, got, want) if not torch.equal(a, b)]
        assert not bad, f"{variant} max_length={max_length}: ids differ for {bad}"
        # one prompt at a time gives the same rows as the batch
        for i in (0, 4, len(PROMPTS) - 2):
            assert torch.equal(ours([PROMPTS[i]], max_length)[0], got[i])


def test_special_tokens_and_truncation(tok_root):
    clip, t5 = _ours(_build("clip", tok_root)), _ours(_build("t5", tok_root))
    long = [" ".join(["cat"] * 200)]
    ids = clip(long, 16)[0].tolist()
    assert ids[-1] == clip.eos_token_id and len(set(ids[1:-1])) == 1 and ids[0] != ids[1]  # BOS, 14 x cat, EOS
    ids = t5(long, 16)[0].tolist()
    assert ids[-1] == t5.eos_token_id == 1 and t5.eos_token_id not in ids[:-1]  # first 15 tokens + </s>
    assert t5([""], 4)[0].tolist() == [1, 0, 0, 0]
    assert (clip.model_max_length, t5.model_max_length) == (77, 512)
    assert _ours(_build("t5_bare", tok_root)).model_max_length == VERY_LARGE_INTEGER
    for variant in ("clip_json_sides", "t5_sides"):  # left padding and truncation
        left = _ours(_build(variant, tok_root))
        ids = left(["a cat", " ".join(["cat"] * 100)], 8).tolist()
        assert ids[0][0] == left.pad_token_id != ids[0][-2] and ids[0][-1] == ids[1][-1] == left.eos_token_id
    sentinel = t5(["<extra_id_0>"], 4)[0].tolist()
    assert sentinel == [len(t5) - 1, 1, 0, 0]  # <extra_id_0> is the last id, matched whole


def test_call_arguments(tok_root):
    clip = _ours(_build("clip", tok_root))
    assert clip([], 77).shape == (0, 77)
    with pytest.raises(TypeError, match="list of texts"):
        clip("a cat", 77)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        clip(["a cat"], 1)  # no room for BOS + EOS
    t5 = _ours(_build("t5", tok_root))
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        t5(["a cat"], 0)
    assert t5(["a cat"], 1).tolist() == [[1]]


def test_spiece_reader_matches_protobuf(tok_root):
    """The module's own ModelProto reader gives the pieces, scores, types and charsmap protobuf gives."""
    from sentencepiece import sentencepiece_model_pb2

    from diffsynth.models.text_tokenizers import _read_spiece

    for variant in ("t5", "t5_byte_fallback"):
        path = _build(variant, tok_root) / "spiece.model"
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        pieces, charsmap = _read_spiece(path, "T5 tokenizer")
        assert pieces == [(p.piece, p.score, p.type) for p in proto.pieces]
        assert charsmap == proto.normalizer_spec.precompiled_charsmap


def test_no_transformers_import(tok_root):
    clip_dir, t5_dir = _build("clip_release", tok_root), _build("t5_release", tok_root)
    code = (
        "import json, sys\n"
        "from diffsynth.models.text_tokenizers import load_clip_tokenizer, load_t5_tokenizer\n"
        f"prompts = {PROMPTS[:8]!r}\n"
        f"clip = load_clip_tokenizer({str(clip_dir)!r})(prompts, 77).tolist()\n"
        f"t5 = load_t5_tokenizer({str(t5_dir)!r})(prompts, 32).tolist()\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "print(json.dumps([clip, t5]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    clip_ids, t5_ids = json.loads(run.stdout.strip().splitlines()[-1])
    assert clip_ids == _reference_ids(_oracle(clip_dir), PROMPTS[:8], 77).tolist()
    assert t5_ids == _reference_ids(_oracle(t5_dir), PROMPTS[:8], 32).tolist()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CLIP tokenizer folder '.*nowhere' is missing: "
                                                r"expected vocab\.json \+ merges\.txt or tokenizer\.json"):
        load_clip_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError, match=r"lacks the tokenizer files: expected vocab\.json \+ merges\.txt"):
        load_clip_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"T5 tokenizer folder '.*empty' lacks the tokenizer files: "
                                                r"expected spiece\.model or tokenizer\.json"):
        load_t5_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="T5 tokenizer folder .* is missing"):
        load_t5_tokenizer(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("variant, file, content, loader", [
    ("clip", "vocab.json", b"{not json", load_clip_tokenizer),
    ("clip", "vocab.json", b'["a list"]', load_clip_tokenizer),
    ("clip", "vocab.json", b'{"a": "one"}', load_clip_tokenizer),
    ("clip", "merges.txt", b"#version: 0.2\na b c\n", load_clip_tokenizer),
    ("clip", "merges.txt", b"\xff\xfe\x00garbage", load_clip_tokenizer),
    ("clip", "tokenizer_config.json", b"{oops", load_clip_tokenizer),
    ("clip_json", "tokenizer.json", b"\x00\x01 not json", load_clip_tokenizer),
    ("clip_json", "tokenizer.json", b'{"version": "1.0"}', load_clip_tokenizer),
    ("t5", "spiece.model", b"this is not a sentencepiece model", load_t5_tokenizer),
    ("t5", "spiece.model", b"", load_t5_tokenizer),
    ("t5", "special_tokens_map.json", b"[1, 2]", load_t5_tokenizer),
    ("t5_json", "tokenizer.json", b"{truncated", load_t5_tokenizer),
    ("t5_json", "tokenizer.json", b'{"model": {"type": "BPE", "vocab": {"a": 0}}}', load_t5_tokenizer),
])
def test_corrupt_file_named(tok_root, tmp_path, variant, file, content, loader):
    folder = tmp_path / variant
    shutil.copytree(_build(variant, tok_root), folder)
    (folder / file).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{file.replace('.', '[.]')}.* is corrupt"):
        loader(folder)


def test_truncated_spiece_model_named(tok_root, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(_build("t5", tok_root), folder)
    data = (folder / "spiece.model").read_bytes()
    (folder / "spiece.model").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"spiece[.]model' is corrupt: not a sentencepiece model"):
        load_t5_tokenizer(folder)


def test_merge_of_unknown_tokens_named(tok_root, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(_build("clip", tok_root), folder)
    with open(folder / "merges.txt", "a", encoding="utf-8") as f:
        f.write("zzz@@ qqq@@\n")
    with pytest.raises(ValueError, match=r"vocab[.]json' / '.*merges[.]txt' are corrupt"):
        load_clip_tokenizer(folder)


def test_bad_charsmap_in_tokenizer_json_named(tok_root, tmp_path):
    folder = tmp_path / "t5_json"
    shutil.copytree(_build("t5_json", tok_root), folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(b"\x01\x02").decode()}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tokenizer[.]json' is corrupt"):
        load_t5_tokenizer(folder)
