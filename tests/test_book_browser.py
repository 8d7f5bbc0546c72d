"""Browser check of the built book (`_build/html`).

`make test` builds the book first (`make book`); this file only reads the
result. The pages are served from a local HTTP server on 127.0.0.1 and opened
in Debian's Chromium (/usr/bin/chromium) through Playwright; no browser is
ever downloaded. Every check is about what a reader sees offline:

- each page loads with no request to any host but the local server, no failed
  local request and no JavaScript error;
- math is typeset by the bundled MathJax (no error nodes, no raw TeX left);
- every image has loaded (naturalWidth > 0);
- every internal link points to an existing file, and its #anchor exists;
- search finds "momentum"; dropdown solutions open; animations play;
- the glossary carries the Chinese terms.

Screenshots of the intro, the first chapter and the glossary (1280 px wide)
are written to `_build/screenshots/` for a person to look at.
"""

from __future__ import annotations

import html.parser
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
VIEWPORT = {"width": 1280, "height": 900}
# Folders of the build that hold assets, not pages.
NOT_PAGES = {"_static", "_sources", "_images", "_downloads"}
# Generous upper bounds for waiting on the page's own scripts (not assertions
# about speed: a check fails only if the thing never happens).
WAIT_MS = 30_000

GLOSSARY_CHINESE = ["批标准化", "内部协变量偏移", "梯度消失", "滑动平均", "谱归一化"]


# --------------------------------------------------------------------------
# The pages and their links, read from the files (no browser needed)
# --------------------------------------------------------------------------


def html_pages(root: Path) -> list[str]:
    """Paths (relative, with '/') of every HTML page of the book."""
    pages = []
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root)
        if rel.parts[0] in NOT_PAGES:
            continue
        pages.append(rel.as_posix())
    return pages


class _LinksAndIds(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.refresh: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "a" and attrs.get("href") is not None:
            self.hrefs.append(attrs["href"])
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            content = attrs.get("content") or ""
            if "url=" in content.lower():
                self.refresh = content[content.lower().index("url=") + 4 :].strip()


def _parse(path: Path) -> _LinksAndIds:
    parser = _LinksAndIds()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def _resolve(root: Path, page: str, href: str) -> tuple[Path, str] | None:
    """The local file and fragment an href points to; None for external links."""
    if href.startswith(("mailto:", "javascript:", "data:", "tel:")):
        return None
    parts = urllib.parse.urlsplit(href)
    if parts.scheme or parts.netloc:
        return None  # a plain hyperlink to another site: allowed
    path = urllib.parse.unquote(parts.path)
    page_file = root / page
    if not path:
        target = page_file
    else:
        target = (page_file.parent / path).resolve()
        if path.endswith("/") or target.is_dir():
            target = target / "index.html"
    return target, urllib.parse.unquote(parts.fragment)


def test_internal_links_resolve(book_html_dir):
    root = book_html_dir.resolve()
    pages = html_pages(root)
    parsed = {page: _parse(root / page) for page in pages}
    ids = {(root / page).resolve(): p.ids for page, p in parsed.items()}
    problems = []
    checked = 0
    for page, p in parsed.items():
        hrefs = list(p.hrefs) + ([p.refresh] if p.refresh else [])
        for href in hrefs:
            resolved = _resolve(root, page, href)
            if resolved is None:
                continue
            target, fragment = resolved
            checked += 1
            if root not in target.parents and target != root:
                problems.append(f"{page}: {href!r} points outside the book")
            elif not target.is_file():
                problems.append(f"{page}: {href!r} -> missing file {target.relative_to(root)}")
            elif fragment and target.suffix == ".html":
                target_ids = ids.get(target)
                if target_ids is None:
                    target_ids = ids[target] = _parse(target).ids
                if fragment not in target_ids:
                    problems.append(f"{page}: {href!r} -> no id {fragment!r} in {target.relative_to(root)}")
    assert checked > 0, "no internal links found: is _build/html a Jupyter Book build?"
    assert not problems, f"{len(problems)} broken internal link(s):\n" + "\n".join(problems)


# --------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's Chromium is not installed at /usr/bin/chromium; install it with "
            "`sudo apt-get install chromium` (this test never downloads a browser)."
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    pw = sync_api.sync_playwright().start()
    try:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
    except Exception:
        pw.stop()
        raise
    try:
        yield browser
    finally:
        browser.close()
        pw.stop()


class Visit:
    """A page opened in a fresh context, with every request it made recorded."""

    def __init__(self, browser, url: str, color_scheme: str = "light"):
        self.context = browser.new_context(viewport=VIEWPORT, color_scheme=color_scheme)
        self.page = self.context.new_page()
        self.external: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", self._on_request)
        self.page.on("response", self._on_response)
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url, wait_until="load", timeout=WAIT_MS)

    def _on_request(self, request):
        parts = urllib.parse.urlsplit(request.url)
        if parts.scheme in ("data", "blob", "about"):
            return
        if parts.hostname not in LOCAL_HOSTS:
            self.external.append(request.url)

    def _on_response(self, response):
        path = urllib.parse.urlsplit(response.url).path
        if response.status >= 400 and path != "/favicon.ico":
            self.failed.append(f"{response.url} (HTTP {response.status})")

    def close(self):
        self.context.close()


_WAIT_FOR_MATHJAX = """
async (timeoutMs) => {
  if (!document.querySelector('.math')) return 'no-math';
  const deadline = Date.now() + timeoutMs;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    if (Date.now() > deadline) return 'mathjax-not-loaded';
    await sleep(50);
  }
  const timeout = sleep(timeoutMs).then(() => 'timeout');
  return await Promise.race([MathJax.startup.promise.then(() => 'typeset'), timeout]);
}
"""

_MATH_STATE = """
() => {
  const skip = new Set(['PRE', 'CODE', 'SCRIPT', 'STYLE', 'TEXTAREA', 'KBD', 'SAMP',
                        'MJX-CONTAINER', 'MJX-ASSISTIVE-MML']);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let e = node.parentElement; e; e = e.parentElement) {
        if (skip.has(e.tagName)) return NodeFilter.FILTER_REJECT;
      }
      return NodeFilter.FILTER_ACCEPT;
    }
  });
  const raw = [];
  const tex = /\\$\\$|\\\\\\(|\\\\\\)|\\\\\\[|\\\\\\]|\\\\begin\\{/;
  while (walker.nextNode()) {
    const t = walker.currentNode.nodeValue;
    if (tex.test(t)) raw.push(t.trim().slice(0, 80));
  }
  return {
    math: document.querySelectorAll('.math').length,
    containers: document.querySelectorAll('mjx-container').length,
    errors: Array.from(document.querySelectorAll('mjx-merror')).map((e) => e.textContent.slice(0, 80)),
    raw: raw,
    // display equations wider than their column (they scroll sideways)
    wide: Array.from(document.querySelectorAll('mjx-container[display="true"]'))
      .filter((e) => e.scrollWidth > e.clientWidth + 2)
      .map((e) => (e.getAttribute('aria-label') || e.textContent).slice(0, 80)),
  };
}
"""

_BAD_IMAGES = """
async (timeoutMs) => {
  const imgs = Array.from(document.images);
  imgs.forEach((i) => { if (i.loading === 'lazy') i.loading = 'eager'; });
  // Animation frames get their src from a script shortly after load.
  const deadline = Date.now() + timeoutMs;
  const pending = () => imgs.some((i) => !i.getAttribute('src') || !i.complete);
  while (pending() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  return imgs.filter((i) => !(i.complete && i.naturalWidth > 0))
             .map((i) => `${i.id || i.alt || 'img'}: ${(i.getAttribute('src') || '<no src>').slice(0, 100)}`);
}
"""


@pytest.fixture(scope="module")
def crawl(book_html_dir, browser, book_url):
    """Open every page once; return what each one did and showed."""
    shots = book_html_dir.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    pages = [p for p in html_pages(book_html_dir) if p != "index.html"]  # index: a redirect
    chapters = [p for p in pages if p.startswith("chapters/")]
    to_shoot = {"intro.html": "intro.png", "glossary.html": "glossary.png"}
    if chapters:
        to_shoot[chapters[0]] = "chapter.png"
    results = {}
    for page in pages:
        visit = Visit(browser, book_url + page)
        try:
            p = visit.page
            mathjax = p.evaluate(_WAIT_FOR_MATHJAX, WAIT_MS)
            math = p.evaluate(_MATH_STATE)
            bad_images = p.evaluate(_BAD_IMAGES, WAIT_MS)
            text = p.inner_text("body")
            if page in to_shoot:
                height = p.evaluate("document.documentElement.scrollHeight")
                p.screenshot(
                    path=str(shots / to_shoot[page]),
                    full_page=True,
                    clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": min(height, 8000)},
                )
            results[page] = {
                "external": list(visit.external),
                "failed": list(visit.failed),
                "errors": list(visit.errors),
                "mathjax": mathjax,
                "math": math,
                "bad_images": bad_images,
                "text": text,
            }
        finally:
            visit.close()
    if chapters:
        # The first chapter in dark mode, to see that figures stay readable.
        visit = Visit(browser, book_url + chapters[0], color_scheme="dark")
        try:
            visit.page.evaluate(_WAIT_FOR_MATHJAX, WAIT_MS)
            visit.page.evaluate(_BAD_IMAGES, WAIT_MS)
            figure = visit.page.locator(".cell_output img").first
            if figure.count():
                figure.scroll_into_view_if_needed()
            visit.page.screenshot(path=str(shots / "chapter-dark.png"))
        finally:
            visit.close()
    return results


def _report(problems: dict[str, list[str]]) -> str:
    return "\n".join(f"{page}:\n    " + "\n    ".join(items) for page, items in problems.items())


def test_pages_found(crawl):
    assert "intro.html" in crawl and "glossary.html" in crawl, sorted(crawl)


def test_no_request_leaves_localhost(crawl):
    problems = {page: r["external"] for page, r in crawl.items() if r["external"]}
    assert not problems, "requests to other hosts (the book must work offline):\n" + _report(problems)


def test_no_failed_local_request(crawl):
    problems = {page: r["failed"] for page, r in crawl.items() if r["failed"]}
    assert not problems, "local requests that failed:\n" + _report(problems)


def test_no_javascript_errors(crawl):
    problems = {page: r["errors"] for page, r in crawl.items() if r["errors"]}
    assert not problems, "uncaught JavaScript errors:\n" + _report(problems)


def test_math_is_rendered(crawl):
    with_math = {page: r for page, r in crawl.items() if r["math"]["math"]}
    assert with_math, "no page has math: expected at least the notation page"
    problems = {}
    for page, r in with_math.items():
        items = []
        if r["mathjax"] != "typeset":
            items.append(f"MathJax did not finish: {r['mathjax']}")
        if r["math"]["containers"] == 0:
            items.append("no mjx-container: the math was not typeset")
        items += [f"MathJax error: {e}" for e in r["math"]["errors"]]
        items += [f"raw TeX left in the text: {t!r}" for t in r["math"]["raw"]]
        items += [f"display equation wider than the column (split it with aligned): {t!r}"
                  for t in r["math"]["wide"]]
        if items:
            problems[page] = items
    assert not problems, "math not rendered:\n" + _report(problems)


def test_images_load(crawl):
    problems = {page: r["bad_images"] for page, r in crawl.items() if r["bad_images"]}
    assert not problems, "images that did not load (naturalWidth == 0):\n" + _report(problems)


def test_glossary_has_chinese_terms(crawl):
    text = crawl["glossary.html"]["text"]
    missing = [term for term in GLOSSARY_CHINESE if term not in text]
    assert not missing, f"glossary page lacks the Chinese terms {missing}"


def test_screenshots_written(crawl, book_html_dir):
    shots = book_html_dir.parent / "screenshots"
    for name in ("intro.png", "glossary.png"):
        assert (shots / name).stat().st_size > 10_000, f"screenshot {name} is missing or empty"


def test_search_finds_momentum(browser, book_url):
    visit = Visit(browser, book_url + "search.html?q=momentum")
    try:
        results = visit.page.locator("#search-results li")
        results.first.wait_for(state="attached", timeout=WAIT_MS)
        count = results.count()
        assert count >= 1, "search for 'momentum' found nothing"
        assert not visit.external, f"search made requests to other hosts: {visit.external}"
        assert not visit.errors, f"JavaScript errors on the search page: {visit.errors}"
    finally:
        visit.close()


def _pages_containing(root: Path, needle: str) -> list[str]:
    return [p for p in html_pages(root) if needle in (root / p).read_text(encoding="utf-8", errors="replace")]


def test_dropdown_solutions_open(book_html_dir, browser, book_url):
    pages = [
        p for p in _pages_containing(book_html_dir, 'class="solution dropdown')
        if p.startswith("chapters/")
    ] or _pages_containing(book_html_dir, 'class="solution dropdown')
    if not pages:
        pytest.skip("no page has a sphinx-exercise dropdown solution yet")
    visit = Visit(browser, book_url + pages[0])
    try:
        solutions = visit.page.locator(".solution.dropdown")
        n = solutions.count()
        assert n >= 1
        for i in range(min(n, 6)):
            solution = solutions.nth(i)
            # The chevron button sphinx-togglebutton adds to the title; a click on
            # the title's link ("Exercise 1.1") would follow the link instead.
            toggle = solution.locator(":scope > .admonition-title button.toggle-button")
            body = solution.locator(":scope > :not(.admonition-title)").first
            body.wait_for(state="hidden", timeout=WAIT_MS)  # togglebutton hides it on load
            assert not body.is_visible(), f"solution {i} on {pages[0]} is visible before clicking"
            toggle.click()
            body.wait_for(state="visible", timeout=WAIT_MS)
            assert body.is_visible(), f"solution {i} on {pages[0]} did not open"
    finally:
        visit.close()


def test_animations_play(book_html_dir, browser, book_url):
    pages = _pages_containing(book_html_dir, "anim-slider")
    if not pages:
        pytest.skip("no page has a matplotlib JavaScript animation (to_jshtml) yet")
    problems = []
    for page in pages:
        visit = Visit(browser, book_url + page)
        try:
            animations = visit.page.locator(".animation")
            for i in range(animations.count()):
                anim = animations.nth(i)
                slider = anim.locator("input.anim-slider")
                image = anim.locator("img").first
                play = anim.locator('button[title="Play"]')
                if not (slider.count() and image.count() and play.count()):
                    problems.append(f"{page}: animation {i} lacks its slider, frame or play button")
                    continue
                image.wait_for(state="visible", timeout=WAIT_MS)
                before = (slider.input_value(), image.get_attribute("src"))
                play.click()
                try:
                    visit.page.wait_for_function(
                        """([slider, img, value, src]) => slider.value !== value || img.getAttribute('src') !== src""",
                        arg=[slider.element_handle(), image.element_handle(), before[0], before[1]],
                        timeout=WAIT_MS,
                    )
                except Exception:
                    problems.append(f"{page}: animation {i} did not advance after pressing play")
                anim.locator('button[title="Pause"]').click()
            assert not visit.errors, f"JavaScript errors on {page}: {visit.errors}"
        finally:
            visit.close()
    assert not problems, "\n".join(problems)
