"""Model text is untrusted: Markdown is rendered with raw HTML disabled, then the result is
cleaned by an allow-list (nh3), so no script, handler attribute or unsafe URL survives."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

TAGS = {"p", "br", "pre", "code", "em", "strong", "ul", "ol", "li", "blockquote", "hr", "a",
        "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "s",
        "del"}
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
        ["table", "strikethrough"])


def markdown(text: str) -> Markup:
    """Safe HTML for untrusted Markdown ``text``."""
    html = _markdown().render(text)
    return Markup(nh3.clean(html, tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES,  # noqa: S704
                            link_rel="noopener noreferrer nofollow"))


def prompt_html(prompt: str | list[dict[str, Any]]) -> Markup:
    """A text prompt as Markdown; a chat prompt as one labelled block per message."""
    if isinstance(prompt, str):
        return markdown(prompt)
    parts = [Markup('<div class="msg"><div class="role">{}</div>{}</div>').format(
        escape(str(m.get("role", ""))), markdown(str(m.get("content", "")))) for m in prompt]
    return Markup("").join(parts)
