"""Agent and user text to safe HTML: markdown-it-py, Pygments, then nh3.

Agent output is untrusted. Markdown is rendered with raw HTML disabled, code
is highlighted by Pygments, and the result is passed through nh3 with an
allow-list, so that nothing a model writes can run script or carry styles.
"""
from __future__ import annotations

from functools import lru_cache

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

ALLOWED_TAGS = {
    "a", "p", "br", "hr", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "div", "del",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "span": {"class"}, "div": {"class"}, "code": {"class"}, "th": {"align"}, "td": {"align"}}
_FORMATTER = HtmlFormatter(nowrap=True)


@lru_cache(maxsize=64)
def _lexer(lang: str):
    """Looking a lexer up by name scans Pygments' registry; the lexers themselves are stateless, so keep them."""
    try:
        return get_lexer_by_name(lang or "text")
    except ClassNotFound:
        return get_lexer_by_name("text")


def _highlight(code: str, lang: str, _attrs: str) -> str:
    lexer = _lexer((lang or "text").strip().lower()[:40])
    return f'<pre class="highlight"><code>{highlight(code, lexer, _FORMATTER)}</code></pre>'


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    # "commonmark" with html off: raw HTML in the text is shown as text.
    return MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight}).enable("table")


def render_markdown(text: str) -> SafeString:
    html = _markdown().render(text or "")
    cleaned = nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
    return mark_safe(cleaned)  # noqa: S308 - sanitised by nh3 just above


def highlight_code(code: str, lang: str = "python") -> SafeString:
    return mark_safe(_highlight(code, lang, ""))  # noqa: S308 - Pygments escapes its input
