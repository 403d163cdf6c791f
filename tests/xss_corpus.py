"""An XSS corpus, and the checks that say a rendering of it is inert.

Used by the server-side tier (``tests/sessions/test_xss_render.py``: every
payload through the renderers and the page templates) and by the browser tier
(``tests/e2e/test_xss.py``: the payloads in task text, in agent output and in
the names of files a run writes, shown by a real server in Chromium).

Every payload that could run script calls ``xssHit("<its id>")`` (the browser
tests install a trap of that name; an ``alert`` would show up as a dialog) or
fetches ``/xss-beacon/<its id>`` (the browser tests watch the network). The
trap's name has no ``_`` or ``*`` in it: markdown emphasis cannot eat it.

A payload's ``shows`` is text that must be *visible as text* wherever the
payload is rendered as markdown: the markup that would have been an element
is on the page as characters instead.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

TRAP = "xssHit"
BEACON = "/xss-beacon/"


@dataclass(frozen=True)
class Payload:
    id: str
    category: str
    text: str
    shows: str = ""  # visible text wherever rendered as markdown; "" means the payload text itself
    nul: bool = False  # holds a NUL character: forms refuse it, files cannot be named with it

    @property
    def visible(self) -> str:
        return self.shows or self.text

    @property
    def flat(self) -> str:
        """The payload on one line, as the engine keeps a plan step or feedback quoted in a plan."""
        return " ".join(self.text.split())


def _p(id: str, category: str, text: str, shows: str = "", **kw) -> Payload:
    return Payload(id=id, category=category, text=text, shows=shows, **kw)


def hit(id: str) -> str:
    return f"{TRAP}('{id}')"


CORPUS: tuple[Payload, ...] = (
    # --- script elements --------------------------------------------------------
    _p("script-basic", "script", f"<script>{hit('script-basic')}</script>"),
    _p("script-src", "script", f"<SCRIPT SRC={BEACON}script-src.js></SCRIPT>"),
    _p("script-nested", "script", f"<scr<script>ipt>{hit('script-nested')}</scr</script>ipt>"),
    _p("script-module", "script", f'<script type="module">{hit("script-module")}</script>'),
    _p("textarea-break", "script", f"</textarea><script>{hit('textarea-break')}</script>"),
    _p("title-break", "script", f"</title><script>{hit('title-break')}</script>"),
    _p("script-comment", "script", f"<script>/*</script><script>*/{hit('script-comment')}</script>",
       shows=f"/{hit('script-comment')}</script>"),  # the two * are emphasis
    # --- event handlers ---------------------------------------------------------
    _p("img-onerror", "handler", f"<img src=x onerror={hit('img-onerror')}>"),
    _p("img-onerror-dq", "handler", f'<img src="x" onerror="{hit("img-onerror-dq")}">'),
    _p("img-slash", "handler", f"<img/src=x/onerror={hit('img-slash')}>"),
    _p("svg-onload", "handler", f"<svg onload={hit('svg-onload')}>"),
    _p("body-onload", "handler", f"<body onload={hit('body-onload')}>"),
    _p("input-autofocus", "handler", f"<input autofocus onfocus={hit('input-autofocus')}>"),
    _p("select-autofocus", "handler", f"<select autofocus onfocus={hit('select-autofocus')}></select>"),
    _p("details-ontoggle", "handler", f"<details open ontoggle={hit('details-ontoggle')}>x</details>"),
    _p("video-source", "handler", f"<video><source onerror={hit('video-source')}></video>"),
    _p("marquee-onstart", "handler", f"<marquee onstart={hit('marquee-onstart')}>m</marquee>"),
    _p("a-onclick", "handler", f'<a href="#" onclick="{hit("a-onclick")}">click</a>'),
    _p("div-mouseover", "handler", f'<div onmouseover="{hit("div-mouseover")}" style="position:fixed;inset:0">hover</div>'),
    _p("handler-entities", "handler", "<img src=x onerror=\"&#x78;&#x73;&#x73;Hit('handler-entities')\">",
       shows="onerror=\"xssHit('handler-entities')\""),
    # --- javascript:, data:, vbscript: URLs -------------------------------------------
    _p("a-js-href", "url", f'<a href="javascript:{hit("a-js-href")}">js link</a>'),
    _p("md-js-link", "url", f"[md js link](javascript:{hit('md-js-link')})", shows=f"(javascript:{hit('md-js-link')})"),
    _p("md-js-case", "url", f"[md js case](JaVaScRiPt:{hit('md-js-case')})", shows=f"(JaVaScRiPt:{hit('md-js-case')})"),
    _p("md-js-entity", "url", f"[md js entity](javascript&#58;{hit('md-js-entity')})", shows=f"(javascript:{hit('md-js-entity')})"),
    _p("md-js-tab", "url", f"[md js tab](java&#x09;script:{hit('md-js-tab')})", shows="md js tab"),  # a relative link: java%09script:… is a path
    _p("md-js-colon", "url", f"[md js colon](javascript&colon;{hit('md-js-colon')})", shows=f"(javascript:{hit('md-js-colon')})"),
    _p("md-img-js", "url", f"![md img js](javascript:{hit('md-img-js')})", shows=f"(javascript:{hit('md-img-js')})"),
    _p("md-data-link", "url", "[md data](data:text/html;base64,PHNjcmlwdD54c3NIaXQoJ21kLWRhdGEtbGluaycpPC9zY3JpcHQ+)",
       shows="(data:text/html;base64,PHNjcmlwdD54c3NIaXQoJ21kLWRhdGEtbGluaycpPC9zY3JpcHQ+)"),
    _p("md-img-data-svg", "url", "![svg](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9eHNzSGl0KCdtZC1pbWctZGF0YS1zdmcnKT4=)",
       shows="(data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9eHNzSGl0KCdtZC1pbWctZGF0YS1zdmcnKT4=)"),
    _p("md-vbs-link", "url", "[md vbs](vbscript:msgbox('md-vbs-link'))", shows="(vbscript:msgbox('md-vbs-link'))"),
    _p("a-vbs-href", "url", "<a href=\"vbscript:msgbox('a-vbs-href')\">vbs</a>"),
    _p("img-data-svg", "url", f"<img src=\"data:image/svg+xml,<svg onload={hit('img-data-svg')}>\">"),
    _p("md-ref-link", "url", f"[md ref][evil-ref]\n\n[evil-ref]: javascript:{hit('md-ref-link')}",
       shows=f"javascript:{hit('md-ref-link')}"),
    _p("md-autolink-js", "url", f"<javascript:{hit('md-autolink-js')}>"),
    _p("md-autolink-quote", "url", f"<https://example.com/\"onmouseover=\"{hit('md-autolink-quote')}>",
       shows=f"https://example.com/\"onmouseover=\"{hit('md-autolink-quote')}"),
    _p("md-link-title", "url", f"[md title](https://example.com \"t\\\" onmouseover=\\\"{hit('md-link-title')}\")",
       shows="md title"),
    _p("md-nested-img-link", "url", f"[![x](javascript:{hit('md-nested-a')})](javascript:{hit('md-nested-b')})",
       shows=f"(javascript:{hit('md-nested-b')})"),
    # --- SVG and MathML -----------------------------------------------------------
    _p("svg-script", "svg", f"<svg><script>{hit('svg-script')}</script></svg>"),
    _p("svg-xlink", "svg", f"<svg><a xlink:href=\"javascript:{hit('svg-xlink')}\"><text x=20 y=20>svg</text></a></svg>"),
    _p("svg-animate", "svg", f"<svg><animate onbegin={hit('svg-animate')} attributeName=x dur=1s>"),
    _p("svg-set-href", "svg", f"<svg><a><set attributeName=href to=javascript:{hit('svg-set-href')} /><text y=9>set</text></a></svg>"),
    _p("math-mxss", "svg", f"<math><mtext><table><mglyph><style><img src=x onerror={hit('math-mxss')}>"),
    _p("math-href", "svg", f"<math href=\"javascript:{hit('math-href')}\">math</math>"),
    _p("svg-foreign-iframe", "svg",
       f"<svg><foreignObject><iframe srcdoc=\"<script>parent.{hit('svg-foreign-iframe')}</script>\"></iframe></foreignObject></svg>"),
    _p("noscript-mxss", "svg", f"<noscript><p title=\"</noscript><img src=x onerror={hit('noscript-mxss')}>\">"),
    # --- styles -------------------------------------------------------------------
    _p("style-tag", "style", f"<style>body{{background:url({BEACON}style-tag)}}</style>"),
    _p("style-attr", "style", f"<div style=\"background:url({BEACON}style-attr)\">styled</div>"),
    _p("css-expression", "style", f"<div style=\"width:expression({hit('css-expression')})\">expr</div>"),
    _p("link-stylesheet", "style", f"<link rel=stylesheet href={BEACON}link-stylesheet>"),
    _p("style-import", "style", f"<style>@import '{BEACON}style-import';</style>"),
    _p("style-hide-page", "style", "<style>main{display:none}</style><p style=\"color:red\">restyled</p>"),
    # --- frames, plugins, document-level elements --------------------------------------
    _p("iframe-srcdoc", "embed", f"<iframe srcdoc=\"<script>parent.{hit('iframe-srcdoc')}</script>\"></iframe>"),
    _p("iframe-js", "embed", f"<iframe src=\"javascript:parent.{hit('iframe-js')}\"></iframe>"),
    _p("object-data", "embed", f"<object data=\"javascript:{hit('object-data')}\"></object>"),
    _p("embed-src", "embed", f"<embed src=\"data:text/html,<script>{hit('embed-src')}</script>\">"),
    _p("base-href", "embed", f"<base href=\"{BEACON}base-href/\">"),
    _p("meta-refresh", "embed", f"<meta http-equiv=\"refresh\" content=\"0;url={BEACON}meta-refresh\">"),
    _p("form-action", "embed", f"<form action=\"javascript:{hit('form-action')}\"><button>go</button></form>"),
    _p("button-formaction", "embed", f"<button form=x formaction=\"javascript:{hit('button-formaction')}\">go</button>"),
    _p("frameset-onload", "embed", f"<frameset onload={hit('frameset-onload')}>"),
    # --- breaking out of attributes and elements ---------------------------------------
    _p("break-dq", "break", f"\"><img src=x onerror={hit('break-dq')}>"),
    _p("break-sq", "break", f"'><img src=x onerror={hit('break-sq')}>"),
    _p("break-bt", "break", f"`><img src=x onerror={hit('break-bt')}>", shows=f"><img src=x onerror={hit('break-bt')}>"),
    _p("break-dq-handler", "break", f"\" autofocus onfocus=\"{hit('break-dq-handler')}\" x=\""),
    _p("break-sq-handler", "break", "' autofocus onfocus='xssHit(\"break-sq-handler\")' x='"),
    _p("break-unquoted", "break", f"x onmouseover={hit('break-unquoted')} autofocus"),
    _p("break-pre", "break", f"</code></pre><script>{hit('break-pre')}</script>"),
    _p("break-comment", "break", f"--><script>{hit('break-comment')}</script><!--"),
    _p("break-cdata", "break", f"]]><script>{hit('break-cdata')}</script>"),
    _p("break-json", "break", f"\"}}</script><script>{hit('break-json')}</script>"),
    # --- entities and other encodings -----------------------------------------------
    _p("entity-lt", "encoding", f"&lt;script&gt;{hit('entity-lt')}&lt;/script&gt;", shows=f"<script>{hit('entity-lt')}</script>"),
    _p("entity-num", "encoding", f"&#60;img src=x onerror={hit('entity-num')}&#62;", shows=f"<img src=x onerror={hit('entity-num')}>"),
    _p("entity-hex-nosemi", "encoding", f"&#x3Csvg onload={hit('entity-hex-nosemi')}&#x3E",
       shows=f"svg onload={hit('entity-hex-nosemi')}"),
    _p("unicode-escape", "encoding", f"\\u003cimg src=x onerror={hit('unicode-escape')}\\u003e"),
    _p("percent", "encoding", f"%3Cscript%3E{hit('percent')}%3C/script%3E"),
    _p("double-escape", "encoding", f"&amp;lt;script&amp;gt;{hit('double-escape')}&amp;lt;/script&amp;gt;",
       shows=f"&lt;script&gt;{hit('double-escape')}&lt;/script&gt;"),
    # --- template languages -----------------------------------------------------------
    _p("tmpl-django-var", "template", "{{7*7}} {{ request.user.password }} {{ csrf_token }}"),
    _p("tmpl-django-tag", "template", "{% debug %}{% load static %}{% now 'Y' %}"),
    _p("tmpl-other", "template", "${7-7} #{7-7} <%= 7-7 %> [[7-7]] @(7-7)"),
    _p("tmpl-angular", "template", f"{{{{constructor.constructor('{hit('tmpl-angular')}')()}}}}"),
    # --- htmx ---------------------------------------------------------------------
    _p("hx-get-load", "htmx", f"<div hx-get=\"{BEACON}hx-get-load\" hx-trigger=\"load\">hx</div>"),
    _p("hx-on", "htmx", f"<button hx-on:click=\"{hit('hx-on')}\" hx-on::load=\"{hit('hx-on')}\">hx-on</button>"),
    _p("hx-trigger-load-body", "htmx", "<div hx-get=\"/sessions/\" hx-trigger=\"load\" hx-target=\"body\" hx-swap=\"outerHTML\">x</div>"),
    _p("ws-send", "htmx", "<form ws-send hx-trigger=\"load\"><input name=\"type\" value=\"hello\"></form>"),
    _p("hx-swap-oob", "htmx", "<div id=\"session-status\" hx-swap-oob=\"true\" data-status=\"completed\">XSS-OOB</div>"),
    _p("data-hx", "htmx", f"<div data-hx-get=\"{BEACON}data-hx\" data-hx-trigger=\"load\">data-hx</div>"),
    _p("hx-vals-js", "htmx", f"<div hx-vals='js:{{a:{hit('hx-vals-js')}}}' hx-post=\"{BEACON}hx-vals-js\" hx-trigger=\"load\">v</div>"),
    _p("hx-ext-ws", "htmx", f"<div hx-ext=\"ws\" ws-connect=\"{BEACON}hx-ext-ws\">ws</div>"),
    # --- NUL and unicode tricks -------------------------------------------------------------
    _p("nul-in-tag", "unicode", f"<scr\x00ipt>{hit('nul-in-tag')}</script>", shows=f"ipt>{hit('nul-in-tag')}</script>", nul=True),
    _p("nul-in-scheme", "unicode", f"[nul link](java\x00script:{hit('nul-in-scheme')})", shows="nul link", nul=True),  # a relative link
    _p("rlo", "unicode", f"\u202e<img src=x onerror={hit('rlo')}>"),
    _p("zero-width-tag", "unicode", f"<scr\u200bipt>{hit('zero-width-tag')}</script>"),
    _p("zero-width-scheme", "unicode", f"[zw link](java\u200bscript:{hit('zero-width-scheme')})",
       shows="zw link"),  # a relative link
    _p("bom", "unicode", f"\ufeff<script>{hit('bom')}</script>"),
    _p("line-separator", "unicode", f"<img src=x\u2028onerror={hit('line-separator')}>", shows=f"onerror={hit('line-separator')}>"),
    _p("fullwidth", "unicode", f"\uff1cscript\uff1e{hit('fullwidth')}\uff1c/script\uff1e"),
    _p("combining", "unicode", f"<\u0338img src=x onerror={hit('combining')}>"),
    # --- markdown-specific ---------------------------------------------------------------
    _p("md-html-block", "markdown", f"<div>\n<script>{hit('md-html-block')}</script>\n</div>", shows=f"<script>{hit('md-html-block')}</script>"),
    _p("md-fence-break", "markdown", f"```\n</code></pre><script>{hit('md-fence-break')}</script>\n```",
       shows=f"</code></pre><script>{hit('md-fence-break')}</script>"),
    _p("md-fence-info", "markdown", f"```python\" onmouseover=\"{hit('md-fence-info')}\nprint(1)\n```", shows="print(1)"),
    _p("md-fence-lang-script", "markdown", f"```<script>{hit('md-fence-lang')}</script>\nx = 1\n```", shows="x = 1"),
    _p("md-inline-code", "markdown", f"`</code><img src=x onerror={hit('md-inline-code')}>`",
       shows=f"</code><img src=x onerror={hit('md-inline-code')}>"),
    _p("md-html-comment", "markdown", f"<!-- --><img src=x onerror={hit('md-html-comment')}> -->"),
    _p("md-table", "markdown", f"| a | b |\n|---|---|\n| <img src=x onerror={hit('md-table')}> | x |",
       shows=f"<img src=x onerror={hit('md-table')}>"),
    _p("md-heading-attrs", "markdown", f"# heading {{onclick={hit('md-heading-attrs')}}}", shows=f"heading {{onclick={hit('md-heading-attrs')}}}"),
    _p("md-backslash", "markdown", f"\\<script\\>{hit('md-backslash')}\\</script\\>", shows=f"<script>{hit('md-backslash')}</script>"),
    _p("md-link-html-text", "markdown", f"[<img src=x onerror={hit('md-link-html-text')}>](https://example.com)",
       shows=f"<img src=x onerror={hit('md-link-html-text')}>"),
    _p("md-blockquote-html", "markdown", f"> <iframe src=\"javascript:{hit('md-blockquote-html')}\"></iframe>",
       shows=f"<iframe src=\"javascript:{hit('md-blockquote-html')}\"></iframe>"),
)

IDS = [p.id for p in CORPUS]
assert len(IDS) == len(set(IDS)), "payload ids must be unique"
assert len(CORPUS) >= 50

# What a browser can be given in a form field: no NUL (Django's forms refuse it; see the tests).
FORM_SAFE = tuple(p for p in CORPUS if not p.nul)
NUL_PAYLOADS = tuple(p for p in CORPUS if p.nul)


# --- payloads as file names ----------------------------------------------------------


def file_path_for(payload: Payload, suffix: str = "") -> str:
    """The payload as a relative file path a run can write: on one line, ``/`` makes folders.

    Empty, ``.`` and ``..`` parts are dropped or renamed (file systems have no
    such names to give), and each part is kept under 255 bytes.
    """
    parts = []
    for part in payload.flat.split("/"):
        if part in ("", ".", ".."):
            continue
        parts.append(part.encode("utf-8")[:200].decode("utf-8", "ignore"))
    return "/".join(parts) + suffix


def file_paths() -> list[str]:
    """Every form-safe payload as a data file; the attribute breakers also as an image (its name goes in ``alt``)."""
    paths = [file_path_for(p) for p in FORM_SAFE]
    paths += [file_path_for(p, ".png") for p in FORM_SAFE if p.category in ("break", "handler", "url")]
    assert len(paths) == len(set(paths)), "two payloads make the same file name"
    # A file's path cannot also be a folder of another file.
    folders = {path.rsplit("/", i)[0] for path in paths for i in range(1, path.count("/") + 1)}
    assert not folders & set(paths), sorted(folders & set(paths))
    return paths


# --- plan steps for the offline model to quote ----------------------------------------------

STEP_LIMIT = 500  # characters of one plan step (orchestrator.engine.hitl)
STEP_SEPARATOR = " \u2042 "


def plan_steps(payloads=FORM_SAFE, limit: int = STEP_LIMIT) -> list[list[Payload]]:
    """The payloads packed, in order, into as few plan steps as fit ``limit`` characters each."""
    steps: list[list[Payload]] = [[]]
    for payload in payloads:
        candidate = STEP_SEPARATOR.join(p.flat for p in [*steps[-1], payload])
        if steps[-1] and len(candidate) > limit:
            steps.append([payload])
        else:
            steps[-1].append(payload)
    for step in steps:
        assert len(step_text(step)) <= limit, step_text(step)
    return steps


def step_text(step: list[Payload]) -> str:
    return STEP_SEPARATOR.join(p.flat for p in step)


def control_message(number: int, of: int, description: str, agent: str = "researcher") -> str:
    """How the offline control agent announces a step of the plan (orchestrator.engine.offline)."""
    return f"**Step {number}/{of}** \u2014 {description}. Assigned to {agent}."


# --- checking HTML --------------------------------------------------------------------------

SCRIPTY_SCHEMES = re.compile(r"^(javascript|vbscript|data|livescript|mocha):", re.IGNORECASE)
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "xlink:href", "data", "poster", "background", "srcset", "ping", "codebase", "cite"}
# Never acceptable in a page of this app, wherever they come from.
FORBIDDEN_TAGS = {
    "style", "iframe", "frame", "frameset", "object", "embed", "applet", "base", "svg", "math", "video", "audio",
    "source", "track", "marquee", "noscript", "template", "xmp", "plaintext", "isindex", "portal", "set", "animate",
    "foreignobject", "mglyph", "mtext", "param", "dialog", "slot",
}
FORBIDDEN_ATTRIBUTES = {"style", "srcdoc", "formaction", "autofocus", "background", "ping", "http-equiv", "xmlns"}


def scripty_url(value: str) -> bool:
    """Whether a URL attribute would run script or carry inline content (entities, spaces and controls ignored)."""
    squeezed = re.sub(r"[\x00-\x20\u200b\u200c\u200d\ufeff]+", "", html.unescape(value))
    return bool(SCRIPTY_SCHEMES.match(squeezed))


@dataclass
class Element:
    tag: str
    attrs: list[tuple[str, str]]
    ancestors: tuple[str, ...]  # tag names, outermost first
    classes: set[str] = field(default_factory=set)


class Collector(HTMLParser):
    """Every element (with its ancestors) and every text run of an HTML string or page."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.stack: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = [(name, value or "") for name, value in attrs]
        classes = set(dict(values).get("class", "").split())
        self.elements.append(Element(tag, values, tuple(self.stack), classes))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        values = [(name, value or "") for name, value in attrs]
        self.elements.append(Element(tag, values, tuple(self.stack), set(dict(values).get("class", "").split())))

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def collect(markup: str) -> Collector:
    parser = Collector()
    parser.feed(markup)
    parser.close()
    return parser


def squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def active_attribute(name: str) -> bool:
    """An attribute that loads, runs or wires something: payload text has no business in its value."""
    name = name.lower()
    return (
        name in URL_ATTRIBUTES
        or name in FORBIDDEN_ATTRIBUTES
        or name.startswith(("on", "hx-", "ws-", "data-hx-"))
    )
