"""Chat templates: the model's Jinja template compiled the way ``transformers`` compiles it.

A sandboxed environment (a template is data from a checkpoint, not trusted code) with ``trim_blocks`` and
``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` helpers, a ``loopcontrols`` extension and a
``tojson`` that does not escape HTML: the same text as ``transformers``' ``apply_chat_template``, which the
tokenizer tests check on real templates. Compiled templates are cached by their source.
"""

from __future__ import annotations

import datetime
import json
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmlab.errors import ConfigError


@lru_cache(maxsize=16)
def compile_template(template: str):
    """A chat template compiled in a sandboxed Jinja environment set up like transformers'."""
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML; chat templates want the raw JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ConfigError(f"chat_template has a Jinja syntax error at line {exc.lineno}: {exc.message}") from None
