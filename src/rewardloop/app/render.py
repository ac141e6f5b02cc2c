"""Model text is untrusted: Markdown is rendered with raw HTML disabled, then the result is
cleaned by an allow-list (nh3), so no script, handler attribute or unsafe URL survives.

What is rendered must not hide what the model wrote: a line break stays a line break
(``breaks``), an image is shown as its alt text and URL (an annotator judges that it is there,
and a remote image would be a tracking request anyway), and headings start at ``h4`` so they
stay below the page's own headings. Every block gets ``dir="auto"``: right-to-left answers are
laid out right to left, paragraph by paragraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup, escape

TAGS = {"p", "br", "pre", "code", "em", "strong", "ul", "ol", "li", "blockquote", "hr", "a",
        "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "s", "del", "span"}
_BLOCKS = ("p", "li", "h4", "h5", "h6", "blockquote", "th", "td")
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "span": {"class"},
              **{tag: {"dir"} for tag in _BLOCKS}}
URL_SCHEMES = {"http", "https", "mailto"}
HEADING_SHIFT = 3  # "#" becomes h4: the page has h1 (task), h2 (prompt), h3 (answers)


def _image(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """An image as visible text: ``[image: ALT] URL`` (escaped here, cleaned again by nh3)."""
    token = tokens[idx]
    alt = renderer.renderInlineAsText(token.children or [], options, env)
    src = str(token.attrGet("src") or "")
    return str(Markup('<span class="image">[image: {}] {}</span>').format(alt, src))


def _directions(state: Any) -> None:
    """Shift headings down and give every block ``dir="auto"`` (a markdown-it core rule)."""
    for token in state.tokens:
        if token.type == "heading_open" or token.type == "heading_close":
            token.tag = f"h{min(6, int(token.tag[1]) + HEADING_SHIFT)}"
        if token.nesting == 1 and token.tag in _BLOCKS:
            token.attrSet("dir", "auto")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True}).enable(
        ["table", "strikethrough"])
    md.add_render_rule("image", _image)
    md.core.ruler.push("directions", _directions)
    return md


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


def prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    """A prompt as plain text (the page's "Plain text" view): a chat as ``role: content``
    blocks."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)
