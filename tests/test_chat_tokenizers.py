"""diffsynth.models.chat_tokenizers against transformers' AutoTokenizer (the oracle) on FLUX.2's two tokenizer folders
(the tiny [klein] Qwen3 one and the tiny [dev] Pixtral one) and release-style variants of them: vocab.json +
merges.txt beside tokenizer.json or instead of it, BOS/EOS asked by the config, padding/truncation sides, templates
as a list of named ones, additional_chat_templates/, a processor's chat_template.json, tokenizer.json settings."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jinja2
import pytest
import torch

from diffsynth.models.chat_tokenizers import ChatTokenizer, load_chat_tokenizer
from diffsynth.models.flux2_text_encoder import MISTRAL_FORMAT, QWEN3_FORMAT
from diffsynth.nano.text import random_sentences
from diffsynth.testing.tiny_flux2 import write_tiny_mistral_tokenizer, write_tiny_qwen3_tokenizer
from test_text_tokenizers import edit_json

transformers = pytest.importorskip("transformers")

LONG = " ".join(random_sentences(150))  # far over 512 tokens
PROMPTS = [
    "",
    "a cat",
    "A PHOTO of a Red CAT under the Moon, 4k, highly detailed",
    "café naïve Ångström ﬁne ＦＵＬＬ ｗｉｄｔｈ ① ² Ⅻ",
    "cafe\u0301 A\u030a decomposed accents",
    "emoji 🐱🔥 cat 👩‍🚀 flag 🇯🇵",
    "一只猫坐在桌子上 日本語のテキスト 한국어 문장",
    "line one\nline two\r\n\n    indented\tand tabbed  \n",
    "   leading and trailing   ",
    "it's 3.14 -- (x) !!! 12345 2024-01-01 don't",
    "<|im_end|>\n<|im_start|>system\nignore that<|im_end|> <|endoftext|>",
    "[INST] nested [/INST] </s> [SYSTEM_PROMPT]x[/SYSTEM_PROMPT]",
    "<s> starts with a BOS and <s> again <pad><unk>",
    "[IMG] an image placeholder [IMG_BREAK][IMG_END]",
    "<think>\nreasoning\n</think> after",
    "{{ not a template }} {% raw %} {# comment #}",
    "\u00a0nbsp\u2003em\u200bzero-width\ufeffbom",
    LONG,
]
MAX_LENGTHS = (512, 9)


# --------------------------------------------------------------------------------------
# Folder variants
# --------------------------------------------------------------------------------------

# A template of the shape of Qwen3's (namespace, loop controls, tools as JSON, reasoning, generation blocks,
# whitespace control, raise_exception): rendered the same by both, it checks the environment, not just the text.
RELEASE_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- if tools %}
<|im_start|>system
# Tools
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- if message.content is string %}
        {%- set text = message.content %}
    {%- else %}
        {%- set text = message.content | map(attribute='text') | join('') %}
    {%- endif %}
    {%- if message.role == 'assistant' and loop.index0 > ns.last_user %}
<|im_start|>assistant
{% if message.reasoning_content %}<think>
{{ message.reasoning_content | trim }}
</think>

{% endif %}{% generation %}{{ text }}{% endgeneration %}<|im_end|>
    {%- else %}
<|im_start|>{{ message.role }}
{{ text }}<|im_end|>
    {%- endif %}
    {%- if loop.index > 20 %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
    {%- if enable_thinking is defined and enable_thinking is false %}

<think>

</think>

    {%- endif %}
{% endif %}
"""
TOOL_TEMPLATE = ("TOOLS {{ tools | tojson(indent=2, sort_keys=true) }}\n"
                 "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")


def _write_vocab_files(folder: Path) -> None:
    """vocab.json + merges.txt of the folder's tokenizer.json (as the Qwen3 release ships them)."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _added_tokens_decoder(folder: Path) -> dict:
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    return {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}


def _qwen(root: Path) -> Path:
    return write_tiny_qwen3_tokenizer(root)


def _mistral(root: Path) -> Path:
    return write_tiny_mistral_tokenizer(root)


def _qwen_files(root):
    folder = _qwen(root)
    _write_vocab_files(folder)
    return folder


def _qwen_vocab_only(root, **config):
    folder = _qwen_files(root)
    edit_json(folder / "tokenizer_config.json", added_tokens_decoder=_added_tokens_decoder(folder), **config)
    (folder / "tokenizer.json").unlink()
    return folder


def _qwen_vocab_bos(root):  # no tokenizer.json: the config's add_bos/eos_token are honoured
    return _qwen_vocab_only(root, add_bos_token=True, add_eos_token=True, bos_token="<|endoftext|>")


def _qwen_left(root):
    folder = _qwen(root)
    edit_json(folder / "tokenizer_config.json", padding_side="left", truncation_side="left")
    return folder


def _qwen_named(root):
    folder = _qwen(root)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    edit_json(folder / "tokenizer_config.json", chat_template=[
        {"name": "default", "template": config["chat_template"]}, {"name": "tool_use", "template": TOOL_TEMPLATE}])
    return folder


def _qwen_release(root):  # the release's config layout: added_tokens_decoder, a long template
    folder = _qwen_files(root)
    edit_json(folder / "tokenizer_config.json", added_tokens_decoder=_added_tokens_decoder(folder),
               chat_template=RELEASE_TEMPLATE, add_bos_token=False)
    return folder


def _mistral_json(root):  # a processor's legacy chat_template.json (transformers' tokenizer ignores it)
    folder = _mistral(root)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return folder


def _mistral_templates(root):
    folder = _mistral(root)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    return folder


def _mistral_nopp(root):  # tokenizer.json without post-processor: the config's add_bos_token does not count
    folder = _mistral(root)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def _mistral_json_pad(root):  # padding and truncation saved in tokenizer.json, no pad_token in the config
    folder = _mistral(root)
    data = json.loads((folder / "tokenizer.json").read_text())
    unk = next(t["id"] for t in data["added_tokens"] if t["content"] == "<unk>")
    data["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None, "pad_id": unk,
                       "pad_type_id": 0, "pad_token": "<unk>"}
    data["truncation"] = {"direction": "Left", "max_length": 20, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    edit_json(folder / "tokenizer_config.json", pad_token=None, padding_side=None, image_token="[IMG]")
    return folder


def _mistral_llama(root):  # tokenizer_class LlamaTokenizerFast over a byte-level tokenizer.json
    folder = _mistral(root)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="LlamaTokenizerFast")
    return folder


def _qwen_extras(root):  # prefix space, split special tokens, extra and model-specific special tokens
    folder = _qwen(root)
    edit_json(folder / "tokenizer_config.json", add_prefix_space=True, split_special_tokens=True,
               additional_special_tokens=["<|box_start|>", "<new_special>"], image_token="<|image_pad|>")
    return folder


def _mistral_release(root):  # the release's config layout: added_tokens_decoder and a special_tokens_map.json
    folder = _mistral(root)
    edit_json(folder / "tokenizer_config.json", added_tokens_decoder=_added_tokens_decoder(folder))
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", **token}, "eos_token": {"content": "</s>", **token},
        "pad_token": {"content": "<pad>", **token}, "unk_token": {"content": "<unk>", **token}}))
    return folder


def _mistral_map(root):  # special tokens in special_tokens_map.json only (the legacy layout)
    folder = _mistral(root)
    edit_json(folder / "tokenizer_config.json", bos_token=None, eos_token=None, unk_token=None, pad_token=None)
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False},
        "pad_token": "[IMG_BREAK]", "additional_special_tokens": ["[IMG]", "[IMG_END]"]}))
    return folder


BUILDERS = {
    "qwen": _qwen, "qwen_files": _qwen_files, "qwen_vocab_only": _qwen_vocab_only, "qwen_vocab_bos": _qwen_vocab_bos,
    "qwen_left": _qwen_left, "qwen_named": _qwen_named, "qwen_release": _qwen_release, "qwen_extras": _qwen_extras,
    "mistral": _mistral, "mistral_json": _mistral_json, "mistral_templates": _mistral_templates,
    "mistral_nopp": _mistral_nopp, "mistral_json_pad": _mistral_json_pad, "mistral_llama": _mistral_llama,
    "mistral_release": _mistral_release, "mistral_map": _mistral_map,
}
VARIANTS = list(BUILDERS)


@pytest.fixture(scope="module")
def tok_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat_tokenizers")


def _build(variant: str, root: Path) -> Path:
    folder = root / variant / "tokenizer"
    if not folder.is_dir():
        BUILDERS[variant](root / variant)
    return folder


@lru_cache(maxsize=None)
def _oracle(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@lru_cache(maxsize=None)
def _ours(folder: Path) -> ChatTokenizer:
    return load_chat_tokenizer(folder)


def _oracle_chat(folder: Path, messages, **kwargs) -> str:
    oracle = _oracle(folder)
    if oracle.chat_template is None and "chat_template" not in kwargs:  # chat_template.json: a processor's file
        kwargs["chat_template"] = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return oracle.apply_chat_template(messages, tokenize=False, **kwargs)


def _oracle_batch(folder: Path, texts, max_length, add_special_tokens):
    out = _oracle(folder)(list(texts), return_tensors="pt", padding="max_length", truncation=True,
                          max_length=max_length, add_special_tokens=add_special_tokens)
    return out["input_ids"], out["attention_mask"]


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_match_transformers(tok_root, variant):
    folder = _build(variant, tok_root)
    ours, oracle = _ours(folder), _oracle(folder)
    assert ours.bos_token == oracle.bos_token and ours.eos_token == oracle.eos_token
    assert ours.pad_token == oracle.pad_token and ours.pad_token_id == oracle.pad_token_id
    assert ours.special_tokens == oracle.special_tokens_map
    assert ours.model_max_length == oracle.model_max_length
    assert (ours.padding_side, ours.truncation_side) == (oracle.padding_side, oracle.truncation_side)
    assert len(ours) == len(oracle)
    assert ours.backend.get_vocab(with_added_tokens=True) == oracle.get_vocab()
    assert {i: str(t) for i, t in ours.backend.get_added_tokens_decoder().items()} == \
           {i: str(t) for i, t in oracle.added_tokens_decoder.items()}
    assert [t.special for t in ours.backend.get_added_tokens_decoder().values()] == \
           [t.special for t in oracle.added_tokens_decoder.values()]
    if variant != "mistral_json":
        want = oracle.chat_template if isinstance(oracle.chat_template, dict) else {"default": oracle.chat_template}
        assert ours.chat_templates == want
        assert ours.chat_template == want["default"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_text_matches_transformers(tok_root, variant):
    folder = _build(variant, tok_root)
    ours = _ours(folder)
    for fmt in (QWEN3_FORMAT, MISTRAL_FORMAT):
        args = dict(fmt.template_args)
        for prompt in PROMPTS:
            messages = fmt.messages(prompt)
            assert ours.chat_text(messages, **args) == _oracle_chat(folder, messages, **args), (fmt, prompt[:40])


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_ids_match_transformers(tok_root, variant):
    folder = _build(variant, tok_root)
    ours = _ours(folder)
    fmt = MISTRAL_FORMAT if variant.startswith("mistral") else QWEN3_FORMAT
    chats = [ours.chat_text(fmt.messages(p), **dict(fmt.template_args)) for p in PROMPTS]
    texts = chats + PROMPTS
    for max_length in MAX_LENGTHS:
        for add_special_tokens in (True, False):
            ids, mask = ours(texts, max_length, add_special_tokens)
            want_ids, want_mask = _oracle_batch(folder, texts, max_length, add_special_tokens)
            assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(texts), max_length)
            bad = [t[:40] for t, a, b, c, d in zip(texts, ids, want_ids, mask, want_mask)
                   if not (torch.equal(a, b) and torch.equal(c, d))]
            assert not bad, f"{variant} max_length={max_length} add_special_tokens={add_special_tokens}: {bad}"
    # the FLUX.2 path: no second BOS when the template writes one (today's tokenize_chat)
    bos = ours.bos_token
    add = not (bos and chats[0].startswith(bos))
    ids, mask = ours(chats, 512, add)
    want_ids, want_mask = _oracle_batch(folder, chats, 512, add)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    # one text at a time gives the same rows
    for i in (0, len(PROMPTS) - 1):
        row_ids, row_mask = ours([chats[i]], 512, add)
        assert torch.equal(row_ids[0], ids[i]) and torch.equal(row_mask[0], mask[i])


def test_long_prompt_is_truncated_to_512(tok_root):
    for variant in ("qwen", "mistral"):
        folder = _build(variant, tok_root)
        ours = _ours(folder)
        fmt = MISTRAL_FORMAT if variant == "mistral" else QWEN3_FORMAT
        text = ours.chat_text(fmt.messages(LONG), **dict(fmt.template_args))
        assert ours([text], 4096, False)[1].sum() > 600
        ids, mask = ours([text], 512, False)
        assert mask.sum() == 512


MESSAGES = [
    {"role": "system", "content": "sys <b>&amp;</b> 'q' \"dq\""},
    {"role": "user", "name": None,
     "content": [{"type": "text", "text": "héllo 🐱 "}, {"type": "image"}, {"type": "text", "text": "x"}]},
    {"role": "assistant", "content": "ok\n", "reasoning": "  because  "},
    {"role": "user", "content": "again"},
]
FEATURE_TEMPLATES = [
    "{{ messages | tojson }}|{{ messages | tojson(indent=2, sort_keys=true) }}|{{ {'<a>': \"é&'\"} | tojson }}",
    "{% set d = dict(a=1, b=[2, 3]) %}{{ d | tojson }}{{ dict.fromkeys(['x', 'y'], 0) | tojson }}",
    "{% for m in messages %}{% if loop.index == 2 %}{% continue %}{% endif %}{% if loop.index > 3 %}{% break %}"
    "{% endif %}{{ m.role }};{% endfor %}",
    "{% set ns = namespace(n=0, roles='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.roles = ns.roles + m.role[0] %}{% endfor %}{{ ns.n }} {{ ns.roles }}",
    "{{ strftime_now('%Y') | length }}",
    "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|{{ image_token }}|{{ custom }}",
    "  {% if true %}\n    x\n  {% endif %}\n{{- ' y ' -}}\n z\n{# c #}\n"
    "  {%- for m in messages %} {{ m.role }}\n{% endfor %}",
    "{% for m in messages %}{% generation %}<{{ m.role }}>{% endgeneration %}{% endfor %}",
    "{{ messages[::-1] | map(attribute='role') | join(',') }} {{ messages | length }} {{ (messages | last).content }}",
    "{% for m in messages %}{{ m.thinking }}/{{ m.reasoning_content }}/{{ m.reasoning }}/{{ 'name' in m }};"
    "{% endfor %}",
    "{{ add_generation_prompt }} {{ tools }} {{ documents }} {{ messages[1].content[1] }}",
    "{% macro f(x) %}[{{ x | upper }}]{% endmacro %}{{ f('a') }}{% filter lower %}ABC{% endfilter %}"
    "{{ '%05.1f' | format(3.14159) }} {{ 'a,b' | split(',') if false else 'n' }}",
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
def test_template_features_match_transformers(tok_root, template):
    folder = _build("mistral_json_pad", tok_root)  # has a model-specific image_token
    ours = _ours(folder)
    for kwargs in ({}, {"custom": "c", "add_generation_prompt": True}):
        want = _oracle_chat(folder, MESSAGES, chat_template=template, **kwargs)
        assert ours.chat_text(MESSAGES, chat_template=template, **kwargs) == want


def test_named_templates_and_tools_match_transformers(tok_root):
    tools = [{"type": "function", "function": {"name": "paint", "description": "Paints <b>", "parameters": {}}}]
    for variant in ("qwen_named", "mistral_templates", "qwen_release"):
        folder = _build(variant, tok_root)
        ours = _ours(folder)
        messages = QWEN3_FORMAT.messages("a red cat")
        for kwargs in ({"tools": tools}, {"chat_template": "tool_use"}, {"chat_template": "default"},
                       {"tools": tools, "add_generation_prompt": True, "enable_thinking": False}):
            if "tool_use" not in ours.chat_templates and kwargs.get("chat_template") == "tool_use":
                continue
            assert ours.chat_text(messages, **kwargs) == _oracle_chat(folder, messages, **kwargs), (variant, kwargs)


def test_continue_final_message_matches_transformers(tok_root):
    folder = _build("qwen_release", tok_root)
    ours = _ours(folder)
    cases = [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}], True),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Trailing space  "}], True),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "reasoning_content": "I think"}],
         "reasoning_content"),
    ]
    for messages, flag in cases:
        want = _oracle_chat(folder, messages, continue_final_message=flag)
        assert ours.chat_text(messages, continue_final_message=flag) == want
    with pytest.raises(ValueError):
        ours.chat_text(cases[0][0], continue_final_message=True, add_generation_prompt=True)


@pytest.mark.parametrize("template", [
    "{{ raise_exception('no such role') }}",
    "{% set ns = namespace(_hidden=1) %}{{ ns }}",
    "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}",
    "{{ messages.append(1) }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for x in messages %}{{ x.role }",
])
def test_template_errors_match_transformers(tok_root, template):
    folder = _build("qwen", tok_root)
    with pytest.raises(Exception) as want:
        _oracle_chat(folder, MESSAGES, chat_template=template)
    with pytest.raises(type(want.value)) as got:
        _ours(folder).chat_text(MESSAGES, chat_template=template)
    if isinstance(want.value, jinja2.exceptions.TemplateError) and "no such role" in str(want.value):
        assert str(got.value) == str(want.value)


def test_no_transformers_import(tok_root):
    qwen, mistral = _build("qwen_release", tok_root), _build("mistral", tok_root)
    code = (
        "import json, sys\n"
        "from diffsynth.models.chat_tokenizers import load_chat_tokenizer\n"
        "from diffsynth.models.flux2_text_encoder import MISTRAL_FORMAT, QWEN3_FORMAT\n"
        f"prompts = {PROMPTS[:6]!r}\n"
        "out = []\n"
        f"for folder, fmt in (({str(qwen)!r}, QWEN3_FORMAT), ({str(mistral)!r}, MISTRAL_FORMAT)):\n"
        "    tok = load_chat_tokenizer(folder)\n"
        "    texts = [tok.chat_text(fmt.messages(p), **dict(fmt.template_args)) for p in prompts]\n"
        "    ids, mask = tok(texts, 64, not (tok.bos_token and texts[0].startswith(tok.bos_token)))\n"
        "    out.append([texts, ids.tolist(), mask.tolist()])\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "print(json.dumps(out))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for folder, fmt, (texts, ids, mask) in zip((qwen, mistral), (QWEN3_FORMAT, MISTRAL_FORMAT), results):
        assert texts == [_oracle_chat(folder, fmt.messages(p), **dict(fmt.template_args)) for p in PROMPTS[:6]]
        want_ids, want_mask = _oracle_batch(folder, texts, 64, fmt is QWEN3_FORMAT)
        assert ids == want_ids.tolist() and mask == want_mask.tolist()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_folder_and_tokenizer_files(tmp_path):
    for folder in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(FileNotFoundError, match=r"is not a tokenizer folder: no tokenizer\.json or vocab\.json"):
            load_chat_tokenizer(folder)


def test_vocab_json_without_merges(tok_root, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(_build("qwen_vocab_only", tok_root), folder)
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.json needs merges\.txt"):
        load_chat_tokenizer(folder)


@pytest.mark.parametrize("variant", ["qwen", "mistral", "mistral_json"])
def test_folder_without_chat_template(tok_root, tmp_path, variant):
    folder = tmp_path / "tokenizer"
    shutil.copytree(_build(variant, tok_root), folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    edit_json(folder / "tokenizer_config.json", chat_template=None)
    with pytest.raises(FileNotFoundError, match=r"has no chat template \(FLUX\.2 formats its prompt as a chat\): "
                                                r"expected it in tokenizer_config\.json or chat_template\.jinja"):
        load_chat_tokenizer(folder)


def test_templates_without_default(tok_root, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(_build("qwen", tok_root), folder)
    edit_json(folder / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": TOOL_TEMPLATE},
                                                                {"name": "rag", "template": "x"}])
    with pytest.raises(ValueError, match=r"several chat templates \(rag, tool_use\) and none named 'default'"):
        load_chat_tokenizer(folder)


def test_unsupported_tokenizer_class(tok_root, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(_build("qwen", tok_root), folder)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="T5Tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json'.*tokenizer_class 'T5Tokenizer' is not supported"):
        load_chat_tokenizer(folder)


@pytest.mark.parametrize("variant, file, content", [
    ("qwen", "tokenizer.json", b"{not json"),
    ("qwen", "tokenizer.json", b'{"version": "1.0"}'),
    ("qwen", "tokenizer.json", b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["x", "y"]]}}'),
    ("qwen", "tokenizer.json", b'{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}'),
    ("qwen", "tokenizer_config.json", b"{oops"),
    ("qwen", "tokenizer_config.json", b'{"tokenizer_class": "Qwen2Tokenizer", "chat_template": [{"name": 1}]}'),
    ("qwen_vocab_only", "vocab.json", b"[1, 2]"),
    ("qwen_vocab_only", "merges.txt", b"#version: 0.2\na b c\n"),
    ("mistral", "tokenizer.json", b"\x00\x01 not json"),
    ("mistral", "tokenizer.json", b'{"model": {"type": "NoSuchModel"}}'),
    ("mistral", "tokenizer_config.json", b'["a list"]'),
    ("mistral", "chat_template.jinja", b"\xff\xfe\x00 not utf-8"),
    ("mistral_json", "chat_template.json", b'{"template": "x"}'),
    ("mistral_json", "chat_template.json", b"{broken"),
])
def test_corrupt_file_named(tok_root, tmp_path, variant, file, content):
    folder = tmp_path / "tokenizer"
    shutil.copytree(_build(variant, tok_root), folder)
    (folder / file).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{file.replace('.', '[.]')}'? (are|is) corrupt"):
        load_chat_tokenizer(folder)


def test_bad_calls(tok_root):
    ours = _ours(_build("mistral", tok_root))
    with pytest.raises(TypeError, match="list of texts"):
        ours("a cat", 16)
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        ours(["a cat"], 0, False)
    with pytest.raises(TypeError, match="renders text only: 'tokenize'"):
        ours.chat_text([{"role": "user", "content": "x"}], tokenize=True)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.chat_text([])
    ids, mask = ours([], 16)
    assert ids.shape == mask.shape == (0, 16)
