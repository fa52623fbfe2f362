"""Chat messages -> prompt text with a model's Jinja chat template, rendered the way transformers'
apply_chat_template renders it (sandboxed; trim_blocks, lstrip_blocks; raise_exception, tojson,
strftime_now). Used by the HTTP front end; needs jinja2, never torch or transformers.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import ClassVar


class ChatTemplateError(ValueError):
    """The template could not be compiled or refused the messages (its raise_exception)."""


@functools.lru_cache(maxsize=4)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for training masks; when
        rendering a prompt it is just its body."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format_string):
        return datetime.datetime.now().strftime(format_string)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None


def render_chat(template: str, messages: list[dict], bos_token: str | None = None, eos_token: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text for messages ([{"role", "content"}, ...]); ChatTemplateError when the
    template refuses them (for example roles that do not alternate)."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "")
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None
