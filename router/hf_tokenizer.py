"""Token ids as a real vLLM engine computes them: the model's HF tokenizer and chat template.

The precise ``kv-aware`` index matches a prompt's block hashes against the blocks engines report
in their KV events, which carry vLLM's token ids. So the router must tokenize exactly as vLLM
does, or nothing matches:

- completions: ``tokenizer.json`` with ``add_special_tokens`` as the request says (vLLM's
  default: true for completions);
- chat: the ``chat_template`` of ``tokenizer_config.json`` rendered with the messages and
  ``add_generation_prompt``, then tokenized *without* special tokens (the template writes them),
  vLLM's default for chat requests.

The template is rendered the way ``transformers`` renders it (a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter and a
``raise_exception`` helper), so templates written for it behave the same here. Checked against the
recorded ``/tokenize`` and ``usage.prompt_tokens`` of a real vLLM 0.32.0 server
(``tests/contract/test_hf_tokenizer_contract.py``).

Tokenizer files are read from local directories (a mounted volume, or the model directory the
router shares with the engines), mapped per model root in ``tokenizer_dirs``; a model root that
is itself a directory holding ``tokenizer.json`` needs no mapping. A model with no tokenizer
available is tokenized with the simulator's word-level tokenizer, which keeps the router's own
approximate prefix history consistent but cannot match a real engine's KV events: that is logged
once per model and counted per request in ``shoal_router_tokenizer_fallbacks_total{model}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2.ext import loopcontrols
from tokenizers import Tokenizer

from shoal.router.config import ConfigError
from shoal.router.request_body import PromptTokenizer, TokenizerProvider

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Models without a tokenizer are remembered (not looked up per request), up to this many.
MAX_REMEMBERED_MODELS = 4096


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _template_environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = _raise_exception
    return env


class HfPromptTokenizer:
    """One model's tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        name: str = "",
    ) -> None:
        self._tokenizer = tokenizer
        self._special = dict(special_tokens or {})
        self._template = (
            _template_environment().from_string(chat_template) if chat_template else None
        )
        self.name = name

    @classmethod
    def from_dir(cls, path: str | Path) -> HfPromptTokenizer:
        """Load ``tokenizer.json`` (and ``tokenizer_config.json`` if present) from ``path``."""
        root = Path(path)
        try:
            tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        except Exception as exc:  # the library raises its own exception types
            raise ConfigError(f"cannot load {root / TOKENIZER_FILE}: {exc}") from None
        template: str | None = None
        special: dict[str, str] = {}
        config_path = root / TOKENIZER_CONFIG_FILE
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {config_path}: {exc}") from None
            raw_template = config.get("chat_template")
            if isinstance(raw_template, list):  # named templates: vLLM uses "default"
                named = {t.get("name"): t.get("template") for t in raw_template}
                raw_template = named.get("default")
            template = raw_template if isinstance(raw_template, str) else None
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                text = _token_text(config.get(key))
                if text is not None:
                    special[key] = text
        return cls(tokenizer, template, special, name=str(root))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self._template is None:
            raise ValueError(f"tokenizer {self.name} has no chat template")
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=True, tools=None, **self._special
            )
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception on bad roles
            raise ValueError(f"chat template of {self.name}: {exc}") from None


class HfTokenizers:
    """Tokenizers per model root: from ``tokenizer_dirs``, or the root itself when it is a
    directory with ``tokenizer.json``; ``fallback`` (counted) when neither has one."""

    def __init__(
        self,
        dirs: Mapping[str, str],
        fallback: TokenizerProvider,
        on_fallback: Callable[[str], None] = lambda model: None,
        is_served: Callable[[str], bool] = lambda model: True,
    ) -> None:
        # Loaded eagerly: a wrong path fails the router at start, not its first request.
        self._by_root: dict[str, HfPromptTokenizer] = {
            root: HfPromptTokenizer.from_dir(path) for root, path in dirs.items()
        }
        self._missing: set[str] = set()
        self._fallback = fallback
        self._on_fallback = on_fallback
        # Names nobody serves (a typo, a flood of made-up names) get their 404 after parsing:
        # they must not fill the log, the cache or the metric's label set.
        self._is_served = is_served

    def for_model(self, model: str) -> PromptTokenizer:
        tok = self._by_root.get(model)
        if tok is not None:
            return tok
        if not self._is_served(model):
            return self._fallback.for_model(model)
        if model not in self._missing:
            tok = self._load_from_root(model)
            if tok is not None:
                self._by_root[model] = tok
                return tok
            if len(self._missing) < MAX_REMEMBERED_MODELS:
                self._missing.add(model)
            log.warning(
                "no Hugging Face tokenizer for model %r (map it in tokenizer_dirs): its prompts "
                "are tokenized with the simulator's tokenizer, so kv-aware routing cannot match "
                "a real engine's KV events for it",
                model,
            )
        self._on_fallback(model)
        return self._fallback.for_model(model)

    @staticmethod
    def _load_from_root(model: str) -> HfPromptTokenizer | None:
        candidate = Path(model)
        if not (candidate / TOKENIZER_FILE).is_file():
            return None
        try:
            return HfPromptTokenizer.from_dir(candidate)
        except ConfigError as exc:
            log.warning("%s", exc)
            return None
