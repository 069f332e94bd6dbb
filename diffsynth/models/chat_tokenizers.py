"""FLUX.2's chat-prompt tokenizers (Qwen3 for [klein], Mistral-Small for [dev]) without transformers.

FLUX.2 renders a prompt through the tokenizer folder's chat template, then tokenizes the text to a fixed length.
``load_chat_tokenizer(folder)`` does both from the folder transformers' ``AutoTokenizer.from_pretrained`` reads,
on the ``tokenizers`` library and jinja2 alone (no ``import transformers``, which costs ~2 s per process):

    tok = load_chat_tokenizer(folder)
    text = tok.chat_text(messages, add_generation_prompt=True)
    # == AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids, attention_mask = tok([text], max_length=512, add_special_tokens=False)
    # == tokenizer([text], return_tensors="pt", padding="max_length", truncation=True, max_length=512,
    #              add_special_tokens=False): input_ids, attention_mask

Which pipeline transformers 5 assembles depends on tokenizer_config.json's ``tokenizer_class``:

* ``Qwen2Tokenizer`` (FLUX.2 [klein]'s Qwen3 folder): the BPE vocabulary and merges of tokenizer.json (else of
  vocab.json + merges.txt) inside Qwen2's own pipeline (NFC; Qwen2's split pattern, byte-level alphabet; BPE
  without unknown token), tokenizer.json's post-processor, padding and truncation settings. tokenizer.json's
  normalizer and pre-tokenizer are not used, as transformers does not use them.
* ``PreTrainedTokenizerFast`` / ``TokenizersBackend`` / none (FLUX.2 [dev]'s Pixtral folder): tokenizer.json as
  saved (its post-processor prepends the BOS). So does ``LlamaTokenizer[Fast]`` with a byte-level tokenizer.json.

Added and special tokens are resolved as transformers 5 resolves them (``text_tokenizers.TokenSetup``). The chat
template is rendered the way transformers renders it: a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, loop controls, a ``{% generation %}`` block, a ``tojson`` filter that keeps non-ASCII characters and
HTML characters as they are, ``raise_exception``, ``strftime_now``, a ``namespace`` that refuses underscore names,
and the special tokens (``bos_token``, ``eos_token``, ...) as template variables.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .text_tokenizers import (
    FixedLengthTokenizer,
    bpe_from_tokenizer_json,
    corrupt_file,
    register_added_tokens,
    gc_paused,
    load_tokenizer_json,
    read_bpe_vocab_files,
    read_json,
    token_id,
    TokenSetup,
)

__all__ = ["ChatTokenizer", "load_chat_tokenizer"]

_WHAT = "chat tokenizer"
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
_AS_SAVED_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")  # read as saved when tokenizer.json is byte-level
# Qwen2's pre-tokenizer split: contractions, letter runs (one leading non-letter allowed), single digits,
# punctuation runs with their line breaks, line-break runs, whitespace.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
# The special tokens transformers' Qwen2Tokenizer falls back to when the config names none.
_QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}

_MIN_JINJA = (3, 1, 6)  # older jinja2 releases have known sandbox escapes (transformers refuses them too)
# Message fields a reasoning text is given under; templates read the first, gpt-oss ones read "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# apply_chat_template options about tokenizing its result: chat_text only renders, so it refuses them.
_TOKENIZING_OPTIONS = ("tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")
_NO_TEMPLATE = ("the tokenizer in {folder!r} has no chat template (FLUX.2 formats its prompt as a chat): expected it "
                "in tokenizer_config.json or chat_template.jinja")


# --------------------------------------------------------------------------------------
# The tokenizer object
# --------------------------------------------------------------------------------------


class ChatTokenizer(FixedLengthTokenizer):
    """A tokenizer folder's chat template and text tokenizer.

    ``chat_text(messages, **template_args)`` equals transformers' ``apply_chat_template(messages, tokenize=False,
    **template_args)``; ``tokenizer(texts, max_length, add_special_tokens)`` equals the (input_ids, attention_mask)
    of transformers' ``tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
    max_length=max_length, add_special_tokens=add_special_tokens)``.
    """

    bos_token: str | None
    eos_token: str | None
    chat_template: str  # the default template

    def __init__(
        self,
        backend: Tokenizer,
        *,
        templates: str | dict[str, str],
        special_tokens: dict[str, str],
        eos_token_id: int | None = None,
        **settings,
    ) -> None:
        super().__init__(backend, **settings)
        self._templates = templates  # a str, or named templates (as transformers keeps them)
        self.chat_template = templates if isinstance(templates, str) else templates["default"]
        self.special_tokens = dict(special_tokens)  # transformers' special_tokens_map: the template's variables
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.eos_token_id = eos_token_id

    @property
    def chat_templates(self) -> dict[str, str]:
        """The folder's templates by name (a single template is named "default")."""
        return {"default": self._templates} if isinstance(self._templates, str) else dict(self._templates)

    def __repr__(self) -> str:
        return (f"ChatTokenizer({self.name!r}, vocab={len(self)}, bos={self.bos_token!r}, pad={self.pad_token!r}, "
                f"templates={sorted(self.chat_templates)})")

    # ---------------------------------------------------------------- chat template

    def _template(self, chat_template: str | None, tools: list | None) -> str:
        """transformers' get_chat_template: a template name or text, else the tool-use / default template."""
        templates = self._templates
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                return templates["default"]  # (load_chat_tokenizer refuses templates without a default)
            return chat_template
        return templates if chat_template is None else chat_template

    def chat_text(
        self,
        messages: list[dict],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_args: Any,
    ) -> str:
        """One conversation rendered by the chat template (`template_args`: extra template variables, which win
        over the special-token variables)."""
        for option in _TOKENIZING_OPTIONS:
            if option in template_args:
                raise TypeError(f"chat_text renders text only: {option!r} is an option for tokenizing it")
        template = self._template(chat_template, tools)
        if isinstance(messages, (list, tuple)) and not messages:
            raise ValueError("cannot render an empty conversation: give at least one message")
        if isinstance(messages, (list, tuple)) and (isinstance(messages[0], (list, tuple))
                                                    or hasattr(messages[0], "messages")):
            raise TypeError("chat_text renders one conversation (a list of messages), not a batch of them")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other: the first continues "
                             "the last message, the second opens a new assistant message")
        conversation = _messages_as_dicts(messages)
        variables = {**self.special_tokens, **template_args}
        return render_chat(template, conversation, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, **variables)

    # ---------------------------------------------------------------- tokenizing

    def __call__(self, texts: list[str], max_length: int,
                 add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each ``(len(texts), max_length)`` int64: padded with ``pad_token_id`` on
        the padding side, truncated on the truncation side (keeping room for the special tokens the post-processor
        adds when `add_special_tokens`). A max_length below that count is an error (transformers would not
        truncate at all then)."""
        encodings = self.encode(texts, max_length, add_special_tokens)
        shape = (len(encodings), int(max_length))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(shape)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long).reshape(shape)
        return ids, mask


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_chat_tokenizer(folder: str | Path) -> ChatTokenizer:
    """The text tokenizer of a `tokenizer/` folder (tokenizer.json, or vocab.json + merges.txt) with its chat template
    (chat_template.jinja and additional_chat_templates/*.jinja, else tokenizer_config.json's ``chat_template``, else
    a processor's chat_template.json). A PixtralProcessor folder reads the same way: its text tokenizer alone."""
    folder = Path(folder)
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise FileNotFoundError(f"{str(folder)!r} is not a tokenizer folder: no tokenizer.json or vocab.json")
    with gc_paused():
        return _load(folder)


def _load(folder: Path) -> ChatTokenizer:
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path, _WHAT) if config_path.is_file() else None
    tokenizer_class = (config or {}).get("tokenizer_class")
    tokenizer_json = load_tokenizer_json(folder, _WHAT)
    setup = TokenSetup(folder, _WHAT, tokenizer_json)
    init = setup.init
    if tokenizer_class in _QWEN2_CLASSES:
        backend, json_settings = _qwen2_backend(folder, tokenizer_json, init)
        named = {key: init[key] if key in init else default for key, default in _QWEN2_DEFAULTS.items()}
    elif tokenizer_class is None or tokenizer_class in _AS_SAVED_CLASSES or (
            tokenizer_class in _LLAMA_CLASSES and tokenizer_json is not None and _byte_level(folder)):
        if tokenizer_json is None:
            raise FileNotFoundError(f"{_WHAT} folder {str(folder)!r}: a {tokenizer_class or 'tokenizers'} tokenizer "
                                    "needs tokenizer.json")
        backend, json_settings = _saved_backend(folder)
        named = {}
    else:
        raise ValueError(f"{_WHAT} file {str(config_path)!r}: tokenizer_class {tokenizer_class!r} is not supported "
                         f"(supported: {', '.join(_QWEN2_CLASSES + _AS_SAVED_CLASSES)}, or none)")

    padding = json_settings.get("padding")
    if "pad_token" not in named and "pad_token" not in init and isinstance(padding, dict):
        named["pad_token"] = padding.get("pad_token")  # transformers' fallback to tokenizer.json's padding token
    extra = init.get("extra_special_tokens")
    slots, settings = register_added_tokens(backend, setup, named, extra, folder, _WHAT, tokenizer_json)

    if json_settings.get("post_processor") is None or "add_bos_token" in init or "add_eos_token" in init:
        # transformers' update_post_processor: BOS / EOS around the text as the config's add_*_token say
        # (tokenizer.json, when there is one, wins: its post-processor, and the config's add_*_token are dropped)
        _bos_eos_post_processor(backend, slots, init, folder)
    if tokenizer_class in _QWEN2_CLASSES:
        # Qwen2Tokenizer registers its special tokens once more, as special
        specials = list(dict.fromkeys(str(v) for v in slots.values() if v is not None))
        extras = [str(t) for t in extra] if isinstance(extra, (list, tuple)) else []
        backend.add_tokens([AddedToken(t, special=True) for t in dict.fromkeys(specials + extras)])

    templates = _chat_templates(folder, config)
    special_tokens = {key: str(value) for key, value in slots.items() if value is not None}
    return ChatTokenizer(backend, templates=templates, special_tokens=special_tokens, **settings)


def _byte_level(folder: Path) -> bool:
    """transformers' test for a byte-level tokenizer.json under a Llama tokenizer_class."""
    return '"ByteLevel"' in (folder / "tokenizer.json").read_text(encoding="utf-8")


def _saved_backend(folder: Path) -> tuple[Tokenizer, dict]:
    """tokenizer.json as saved (transformers' TokenizersBackend)."""
    path = folder / "tokenizer.json"
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library rejects the file
        raise corrupt_file(path, _WHAT, e) from e
    return backend, {"post_processor": backend.post_processor, "padding": backend.padding}


def _qwen2_backend(folder: Path, tokenizer_json: dict | None, init: dict) -> tuple[Tokenizer, dict]:
    """transformers' Qwen2Tokenizer: the vocabulary and merges in Qwen2's own pipeline (`init`: the config)."""
    settings: dict[str, Any] = {"post_processor": None, "padding": None}
    if tokenizer_json is not None:
        path = folder / "tokenizer.json"
        model = tokenizer_json["model"]
        if model.get("type", "BPE") != "BPE":
            raise corrupt_file(path, _WHAT, f"a Qwen2 tokenizer needs a BPE model, found {model.get('type')!r}")
        vocab, merges = bpe_from_tokenizer_json(tokenizer_json, path, _WHAT)
        # the post-processor, padding and truncation of the file (read without its vocabulary, as transformers does)
        shell = {**tokenizer_json, "added_tokens": [],
                 "model": {**model, "vocab": {}, "merges": []}}
        try:
            settings_source = Tokenizer.from_str(json.dumps(shell))
        except Exception as e:
            raise corrupt_file(path, _WHAT, e) from e
        settings = {"post_processor": settings_source.post_processor, "padding": settings_source.padding,
                    "truncation": settings_source.truncation}
        files = f"file {str(path)!r} is"
    else:
        if not (folder / "merges.txt").is_file():
            raise FileNotFoundError(f"{_WHAT} folder {str(folder)!r}: vocab.json needs merges.txt beside it "
                                    "(or a tokenizer.json)")
        vocab, merges = read_bpe_vocab_files(folder, _WHAT)
        files = f"files {str(folder / 'vocab.json')!r} / {str(folder / 'merges.txt')!r} are"
    try:
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the tokenizers library rejects the vocabulary or merges
        raise ValueError(f"{_WHAT} {files} corrupt: {e}") from e
    add_prefix_space = init.get("add_prefix_space")
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space), use_regex=False),
    ])
    if settings["post_processor"] is not None:
        backend.post_processor = settings["post_processor"]
    if settings.get("truncation") is not None:
        backend.enable_truncation(**settings["truncation"])
    if settings["padding"] is not None:
        backend.enable_padding(**settings["padding"])
    return backend, settings


def _bos_eos_post_processor(backend: Tokenizer, slots: dict, init: dict, folder: Path) -> None:
    """transformers' update_post_processor: a template adding the BOS / EOS the config asks for (none by default)."""
    unk = slots.get("unk_token")
    parts = {}
    for name, flag in (("bos", "add_bos_token"), ("eos", "add_eos_token")):
        token = slots.get(f"{name}_token")
        if init.get(flag, False) and token is not None:
            index = token_id(backend, token, unk)
            if index is None:
                raise ValueError(f"{_WHAT} in {str(folder)!r}: {flag} asks for {str(token)!r}, which is not in the "
                                 "vocabulary")
            parts[name] = (str(token), index)
    bos, eos = parts.get("bos"), parts.get("eos")
    single = ([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else [])
    pair = single + ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=[p for p in (bos, eos) if p])


# --------------------------------------------------------------------------------------
# Chat templates: where transformers finds them
# --------------------------------------------------------------------------------------


def _read_template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")  # universal newlines, as transformers reads it
    except UnicodeDecodeError as e:
        raise corrupt_file(path, _WHAT, f"not UTF-8 text ({e})") from e


def _named_templates(value: Any, path: Path) -> Any:
    """A template list ``[{"name": ..., "template": ...}]`` -> {name: template}; anything else as it is."""
    if isinstance(value, (list, tuple)):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise corrupt_file(path, _WHAT, f"chat_template entry {str(entry)[:80]!r} is not "
                                            "{\"name\": ..., \"template\": ...}")
            named[entry["name"]] = entry["template"]
        return named
    return value


def _chat_templates(folder: Path, config: dict | None) -> str | dict[str, str]:
    """The template(s) transformers' tokenizer gets: chat_template.jinja and additional_chat_templates/*.jinja
    replace tokenizer_config.json's; without any, a processor's chat_template.json is read."""
    files: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = _read_template_file(folder / "chat_template.jinja")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            files[path.name[: -len(".jinja")]] = _read_template_file(path)
    config_path = folder / "tokenizer_config.json"
    if files:
        templates: Any = files["default"] if list(files) == ["default"] else files
        source = folder / "chat_template.jinja"
    else:
        templates = _named_templates((config or {}).get("chat_template"), config_path)
        source = config_path
    if not templates:
        json_path = folder / "chat_template.json"
        if json_path.is_file():  # what transformers' processors (PixtralProcessor's included) read
            data = read_json(json_path, _WHAT)
            if "chat_template" not in data:
                raise corrupt_file(json_path, _WHAT, "no 'chat_template' entry")
            templates, source = _named_templates(data["chat_template"], json_path), json_path
    if not templates:
        raise FileNotFoundError(_NO_TEMPLATE.format(folder=str(folder)))
    if isinstance(templates, dict):
        bad = [name for name, text in templates.items() if not isinstance(name, str) or not isinstance(text, str)]
        if bad:
            raise corrupt_file(source, _WHAT, f"chat template {bad[0]!r} is not text")
        if "default" not in templates:
            names = ", ".join(sorted(templates))
            raise ValueError(f"the tokenizer in {str(folder)!r} has several chat templates ({names}) and none named "
                             "'default'")
    elif not isinstance(templates, str):
        raise corrupt_file(source, _WHAT, f"chat_template is a {type(templates).__name__}, expected text")
    return templates


# --------------------------------------------------------------------------------------
# Chat templates: rendering as transformers renders them
# --------------------------------------------------------------------------------------


def _jinja_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@lru_cache(maxsize=1)
def _environment():
    """The sandboxed jinja2 environment chat templates run in."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if _jinja_version(jinja2.__version__) < _MIN_JINJA:
        raise ImportError(f"chat templates need jinja2>={'.'.join(map(str, _MIN_JINJA))} (older releases have known "
                          f"sandbox escapes); jinja2 {jinja2.__version__} is installed")

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: marks the assistant's text (for training masks); renders
        its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):  # (no named self: `namespace(self=...)` must stay possible)
            ns, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for key in attrs:
                SafeNamespace.check(key)
            jinja2.utils.Namespace.__init__(ns, attrs)

        def __setitem__(self, key, value):
            SafeNamespace.check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template may not set the underscore-prefixed namespace attribute {key!r}")

    class DictMaker:
        """``dict(...)`` / ``dict.fromkeys(...)`` without the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictMaker(),
                       namespace=SafeNamespace)
    return env


@lru_cache(maxsize=32)
def _compiled(template: str):
    return _environment().from_string(template)


def _messages_as_dicts(messages: Any) -> list[dict]:
    """Message objects (dataclasses, pydantic models, mappings) -> dicts; keys whose value is None dropped."""
    messages = _objects_as_dicts(getattr(messages, "messages", messages))
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
        out.append({key: value for key, value in message.items() if value is not None})
    return out


def _objects_as_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _objects_as_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_objects_as_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_objects_as_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_as_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_as_dicts(value.model_dump())
    return value


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like data; any other object becomes the placeholder "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(chat: list) -> list:
    """A message's reasoning under its older names also filled in as ``reasoning_content`` and ``thinking``."""
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(template: str, messages: list[dict], /, *, tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_generation_prompt: bool = False,
                continue_final_message: bool | str = False, **variables: Any) -> str:
    """`messages` (dicts) rendered by the chat `template` with `variables`, as transformers renders a chat."""
    compiled = _compiled(template)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise TypeError(f"tools must be given as JSON schemas (dicts), got {tool!r}")
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("documents must be dicts (with 'title' and 'text' keys)")
    tools, documents, variables = _plain(tools), _plain(documents), _plain(variables)
    chat = _plain(messages)
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
    chat = _with_reasoning_aliases(chat)
    final = None
    if continue_final_message:
        final, chat = _tag_final_message(chat, continue_final_message, template)
    rendered = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in rendered or tag not in rendered:
            raise ValueError("continue_final_message: the final message does not appear in the rendered chat (the "
                             f"template drops part of it)\nfinal message: {final.strip()}\nrendered chat:\n{rendered}")
        at = rendered.rindex(tag)
        if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:  # the template trimmed the message's trailing whitespace
            rendered = rendered[:at].rstrip()
    return rendered


def _tag_final_message(chat: list[dict], continue_final_message: bool | str, template: str) -> tuple[Any, list]:
    """Mark where the final message's text ends, so that the rendered chat can be cut there."""
    if not chat:
        raise ValueError("continue_final_message needs a conversation with a final message")
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    last = chat[-1]
    final = last.get(field)
    if final is None:
        raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:  # reasoning is present under several names: tag each copy
        fields = [name for name in _REASONING_FIELDS if last.get(name) == final]
    if not any(name in template for name in fields):
        raise ValueError(f"continue_final_message: the chat template never reads {field!r}")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message: the final message has no text block to continue")
    else:
        for name in fields:
            last[name] = last[name] + _CONTINUE_TAG
    return final, chat
