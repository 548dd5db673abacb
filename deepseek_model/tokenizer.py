"""Tokenizer of a checkpoint directory: tokenizer.json + tokenizer_config.json, with its chat template.

The `tokenizers` package reads tokenizer.json (transformers' AutoTokenizer is used when `tokenizers`
alone is missing); the chat template (tokenizer_config.json "chat_template") is rendered with jinja2
the way transformers does (trim_blocks, lstrip_blocks, `raise_exception`), or by transformers when
jinja2 is not installed.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# DeepSeek's special tokens (ids 0 and 1 are BOS/EOS in every DeepSeek config) and a DeepSeek-style chat template.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER_TOKEN + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT_TOKEN + "' + message['content'] + '" + EOS_TOKEN + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "' }}{% endif %}"
)


def byte_symbols() -> list[str]:
    """The GPT-2 byte-level alphabet of byte-level BPE vocabularies: byte b → symbols[b], a printable
    unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


TEMPLATE_MAX_CHARS = 1 << 20  # a rendered chat prompt longer than this is a broken or hostile template
TEMPLATE_MAX_STEPS = 100_000  # loop iterations over range() in one rendering


def _bounded_sandbox(jinja2, sandbox_cls):
    """A jinja2 sandbox with budgets: range() iterations counted across the whole rendering,
    string/list repetition and powers bounded before they allocate, output size capped by the
    caller. A hostile template fails with a TemplateError instead of hanging or exhausting memory."""
    budget = [TEMPLATE_MAX_STEPS]

    def fail(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def bounded_range(*args):
        r = range(*args)
        if len(r) > budget[0]:
            fail(f"loops more than {TEMPLATE_MAX_STEPS} times")
        budget[0] -= len(r)
        return r

    class Bounded(sandbox_cls):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        fail(f"repeats a value to more than {TEMPLATE_MAX_CHARS} items")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                fail("raises to a power above 64")
            return super().call_binop(context, operator, left, right)

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    env.globals["range"] = bounded_range
    return env


def _template_bos(tok_file: str) -> str | None:
    """The special token tokenizer.json's TemplateProcessing post-processor puts before a single
    sequence (where tokenizer_config.json names no bos_token, transformers adds it), or None."""
    try:
        with open(tok_file, encoding="utf-8") as f:
            post = json.load(f).get("post_processor") or {}
    except (OSError, ValueError, AttributeError):
        return None
    single = post.get("single") if isinstance(post, dict) and post.get("type") == "TemplateProcessing" else None
    first = single[0] if isinstance(single, list) and single else None
    special = first.get("SpecialToken") if isinstance(first, dict) else None
    return special.get("id") if isinstance(special, dict) and isinstance(special.get("id"), str) else None


class Tokenizer:
    """Text ⇄ token ids for one checkpoint, plus its chat template.

    Args:
        path: checkpoint directory holding tokenizer.json (and usually tokenizer_config.json), or
            the name of a shipped checkpoint ("mini-shakespeare").

    Raises:
        ValueError: tokenizer.json is missing or unreadable (one line naming the file).
    """

    def __init__(self, path: str | os.PathLike):
        from deepseek_model.pretrained import resolve_checkpoint  # noqa: PLC0415

        self.path = resolve_checkpoint(path)
        tok_file = os.path.join(self.path, TOKENIZER_FILE)
        if not os.path.isfile(tok_file):
            raise ValueError(f"{tok_file}: no tokenizer in the checkpoint (pass token ids instead)")
        cfg_file = os.path.join(self.path, TOKENIZER_CONFIG_FILE)
        self.config: dict[str, Any] = {}
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    self.config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
        self._tok, self._hf = self._load(tok_file)
        self.bos_token = _token_text(self.config.get("bos_token")) or _template_bos(tok_file)
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_id = self.token_to_id(self.bos_token)
        self.eos_id = self.token_to_id(self.eos_token)
        self.chat_template: str | None = self.config.get("chat_template")

    def _load(self, tok_file: str):
        try:
            import tokenizers  # noqa: PLC0415 (optional dependency)
        except ImportError:
            tokenizers = None
        try:
            if tokenizers is not None:
                return tokenizers.Tokenizer.from_file(tok_file), None
            from transformers import AutoTokenizer  # noqa: PLC0415

            return None, AutoTokenizer.from_pretrained(self.path)
        except ImportError:
            raise ValueError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from None
        except Exception as e:  # the Rust tokenizer raises plain Exceptions on bad files
            raise ValueError(f"{tok_file}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True) if self._tok is not None else len(self._hf)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes a token's vocabulary entry spells (a bound on the text one token covers:
        a byte-level token's symbols are 1–2 bytes each for one byte of text)."""
        vocab = self._tok.get_vocab(with_added_tokens=True) if self._tok is not None else self._hf.get_vocab()
        return max((len(t.encode("utf-8")) for t in vocab), default=1)

    def token_to_id(self, token: str | None) -> int | None:
        """The id of a token string (None when absent)."""
        if token is None:
            return None
        if self._tok is not None:
            return self._tok.token_to_id(token)
        tid = self._hf.convert_tokens_to_ids(token)
        return None if tid == self._hf.unk_token_id else tid

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; add_bos prepends the BOS token (as tokenizer_config add_bos_token says)."""
        add_bos = add_bos and bool(self.config.get("add_bos_token", True))
        if self._tok is not None:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._hf(text, add_special_tokens=False).input_ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        if self._tok is not None:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's chat template over messages [{"role": ..., "content": ...}].

        Raises:
            ValueError: the checkpoint has no chat template, or the template rejects the messages.
        """
        if not self.chat_template:
            raise ValueError(f"{os.path.join(self.path, TOKENIZER_CONFIG_FILE)}: no chat_template")
        try:
            import jinja2  # noqa: PLC0415
            from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415
        except ImportError:
            if self._hf is None:
                from transformers import AutoTokenizer  # noqa: PLC0415

                self._hf = AutoTokenizer.from_pretrained(self.path)
            return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

        env = _bounded_sandbox(jinja2, ImmutableSandboxedEnvironment)
        try:
            out, size = [], 0
            for chunk in env.from_string(self.chat_template).generate(
                    messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                    eos_token=self.eos_token or ""):
                size += len(chunk)
                if size > TEMPLATE_MAX_CHARS:
                    raise jinja2.exceptions.TemplateError(f"renders more than {TEMPLATE_MAX_CHARS} characters")
                out.append(chunk)
            return "".join(out)
        except (jinja2.exceptions.TemplateError, OverflowError, RecursionError) as e:
            raise ValueError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat template (its own BOS, no extra one)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


def write_tokenizer_config(out_dir: str | os.PathLike, model_max_length: int) -> str:
    """Write tokenizer_config.json for a byte-level BPE tokenizer.json with the DeepSeek special tokens.

    Args:
        out_dir: checkpoint directory.
        model_max_length: the context length recorded for transformers' AutoTokenizer.

    Returns:
        The file written.
    """
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
              "pad_token": EOS_TOKEN, "clean_up_tokenization_spaces": False, "legacy": True,
              "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": CHAT_TEMPLATE}
    path = os.path.join(os.fspath(out_dir), TOKENIZER_CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of the checkpoint directory `path` (see Tokenizer)."""
    return Tokenizer(path)
