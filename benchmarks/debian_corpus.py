"""Build a multilingual JSONL corpus from the text Debian packages install on this machine: manual
pages (English and their translations) and the Python 3.11 documentation (HTML).

    python benchmarks/debian_corpus.py OUT_DIR [--min-bytes 1000000] [--workers 2]

Writes OUT_DIR/<lang>.jsonl (one {"text", "lang", "source"} record per man page or HTML page, in
sorted path order), OUT_DIR/all.jsonl (every language, languages in sorted order) and
OUT_DIR/SOURCES.md (each Debian package used: version, licence, how much text came from it).

Roff is turned into plain text by the small stripper below, not by `man` (one process per page
would take far too long). It drops comments, requests and macro definitions, keeps the text of the
common man(7) macros (.SH, .TP, .IP, .B, .BR, ...) and a rough subset of mdoc(7), fills paragraphs,
removes font, size and motion escapes and maps the usual character escapes (\\- \\(em \\(aq \\e
...). It is not a roff implementation: text inside conditional blocks is dropped, tables lose
their layout, and the odd escape or macro name may survive. HTML pages keep the text of the
Sphinx main body (stdlib html.parser), without scripts, navigation, sidebars or index pages.

Pages owned by no dpkg package, symbolic links, `.so` redirections, exact duplicates (per
language) and packages named in --exclude-packages (default: those installed from vendor
repositories, not from Debian) are left out.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from multiprocessing import get_context
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
HTML_ROOT = Path("/usr/share/doc/python3.11/html")
# Installed from vendor apt repositories, not Debian. google-cloud-cli alone ships 16,600
# generated reference pages that would be two thirds of the English text.
DEFAULT_EXCLUDE = ("google-cloud-cli", "nodejs")
# Sphinx pages that are indexes or navigation, not prose.
HTML_SKIP = re.compile(r"^(?:_|genindex|py-modindex|search\.html$|contents\.html$)")
MIN_DOC_CHARS = 40  # pages that strip to less are stubs


@dataclass(frozen=True)
class Page:
    path: str
    lang: str
    package: str
    kind: str  # "man" or "html"


# --------------------------------------------------------------------------------------------
# which files, owned by which package


def package_owners(pattern: str) -> dict[str, str]:
    """path -> owning package for every path matching a dpkg -S glob (one dpkg call)."""
    out = subprocess.run(["dpkg", "-S", pattern], capture_output=True, text=True).stdout
    owners = {}
    for line in out.splitlines():
        if line.startswith("diversion by"):
            continue
        pkgs, sep, path = line.partition(": ")
        if sep and "," not in pkgs:  # shared entries are directories
            owners[path] = pkgs.split(":")[0]  # drop a :arch qualifier
    return owners


def man_lang(path: Path) -> str:
    top = path.relative_to(MAN_ROOT).parts[0]
    return "en" if top.startswith("man") else top


def find_pages(exclude: set[str]) -> tuple[list[Page], Counter]:
    """Man pages and HTML pages to convert, sorted by path; and counts of what was left out."""
    owners = {**package_owners(f"{MAN_ROOT}/*"), **package_owners(f"{HTML_ROOT}/*")}
    pages, skipped = [], Counter()
    candidates = [(p, "man") for p in sorted(MAN_ROOT.rglob("*")) if p.parent != MAN_ROOT]
    candidates += [
        (p, "html")
        for p in sorted(HTML_ROOT.rglob("*.html"))
        if not HTML_SKIP.match(p.relative_to(HTML_ROOT).as_posix())
    ]
    for path, kind in candidates:
        if path.is_symlink() or not path.is_file():
            skipped["symbolic link or directory"] += path.is_symlink()
            continue
        package = owners.get(str(path))
        if package is None:
            skipped["owned by no package"] += 1
        elif package in exclude:
            skipped[f"excluded package {package}"] += 1
        else:
            lang = man_lang(path) if kind == "man" else "en"
            pages.append(Page(str(path), lang, package, kind))
    return pages, skipped


# --------------------------------------------------------------------------------------------
# roff -> text

GLYPHS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9",
    "rg": "\u00ae", "tm": "\u2122", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "sl": "/",
    "ba": "|", "bv": "|", "br": "|", "pl": "+", "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1",
    "de": "\u00b0", "sc": "\u00a7", "ps": "\u00b6", "Eu": "\u20ac", "Po": "\u00a3",
    "->": "\u2192", "<-": "\u2190", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260",
    "ua": "\u2191", "da": "\u2193", "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039",
    "fc": "\u203a", "Bq": "\u201e", "bq": "\u201a", "ss": "\u00df", "lB": "[", "rB": "]",
    "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9", "ul": "_", "sq": "\u25a1",
    "OK": "\u2713", "ct": "\u00a2", "at": "@", "sh": "#", "Do": "$", "eq": "=", "or": "|",
}  # fmt: skip
ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303",
           ",": "\u0327", "o": "\u030a", "v": "\u030c"}  # fmt: skip
# Strings the Pod::Man and DocBook preambles define inside conditionals (which are skipped).
STRINGS = {"--": "--", "PI": "pi", 'L"': '"', 'R"': '"', "C`": '"', "C'": '"', "C+": "C++",
           "Aq": "'", "lq": "\u201c", "rq": "\u201d", "Tm": "(TM)", "R": "\u00ae"}  # fmt: skip
SIMPLE = {"-": "-", "e": "\\", "E": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ",
          "'": "'", "`": "`", ".": ".", "_": "_", "c": "\x01"}  # fmt: skip
JOIN = "\x01"  # \c: the next text continues this word
ESCAPE = re.compile(
    r"""\\(?:
      \((?P<glyph2>..)
    | \[(?P<glyph>[^\]]*)\]
    | \*(?:\((?P<str2>..)|\[(?P<strb>[^\]]*)\]|(?P<str1>.))
    | [fFn][-+]?(?:\(..|\[[^\]]*\]|.)
    | s[-+]?(?:\(\d\d|\[[^\]]*\]|'[^']*'|\d)
    | [hvwlLNXbDoRSZxCA]'[^']*'
    | [kz].
    | (?P<char>.)
    )""",
    re.X | re.S,
)
COMMENT = re.compile(r'(?<!\\)\\["#].*')


def glyph(name: str) -> str:
    """A named character: \\(xx, \\[xx], \\[u00E9], \\[char233]; unknown names vanish."""
    if name in GLYPHS:
        return GLYPHS[name]
    if m := re.fullmatch(r"u([0-9A-Fa-f]{4,6})((?:_[0-9A-Fa-f]{4,6})*)", name):
        cps = [m.group(1)] + m.group(2).split("_")[1:]
        return unicodedata.normalize("NFC", "".join(chr(int(c, 16)) for c in cps))
    if m := re.fullmatch(r"char(\d+)", name):
        return chr(int(m.group(1)))
    if len(name) == 2 and name[0] in ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + ACCENTS[name[0]])
    return ""


def _escape(m: re.Match) -> str:
    if (g := m.group("glyph2") or m.group("glyph")) is not None:
        return glyph(g)
    if (s := m.group("str2") or m.group("strb") or m.group("str1")) is not None:
        return STRINGS.get(s, "")
    c = m.group("char")
    if c is None:  # font, size, motion, register: no text
        return ""
    return SIMPLE.get(c, "" if c in "&:%|^/,!{}prudaz)" else c)


def unescape(text: str) -> str:
    return ESCAPE.sub(_escape, COMMENT.sub("", text))


def split_args(args: str) -> list[str]:
    """Macro arguments: space-separated, "double quoted" with "" for a literal quote."""
    out, i, n = [], 0, len(args)
    while i < n:
        if args[i] in " \t":
            i += 1
        elif args[i] == '"':
            j, buf = i + 1, []
            while j < n:
                if args[j] == '"':
                    if args[j + 1 : j + 2] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(args[j])
                j += 1
            out.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and args[j] not in " \t":
                j += 2 if args[j] == "\\" else 1
            out.append(args[i:j])
            i = j
    return out


@dataclass
class Writer:
    """Filled output: words gather into the current line until a break."""

    lines: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    nofill: bool = False
    tag: bool = False  # .TP: the next text is a tag on its own line

    def text(self, s: str) -> None:
        s = s.strip(" ")
        if not s:
            return
        if self.words and self.words[-1].endswith(JOIN):
            self.words[-1] = self.words[-1][:-1] + s
        else:
            self.words.append(s)
        if self.nofill or self.tag:
            self.tag = False
            self.br()

    def br(self) -> None:
        if self.words:
            self.lines.append(" ".join(self.words).replace(JOIN, ""))
            self.words = []

    def para(self) -> None:
        self.br()
        if self.lines and self.lines[-1]:
            self.lines.append("")

    def result(self) -> str:
        self.br()
        text = "\n".join(line.rstrip() for line in self.lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip()


PARA = {"PP", "LP", "P", "Pp", "sp", "HP", "Sp", "Lp", "ns"}
BREAK = {"br", "RS", "RE", "in", "ti", "Bl", "El", "Bd", "Ed", "D1", "Dl", "YS", "ne"}
NOFILL = {"nf": True, "EX": True, "Vb": True, "fi": False, "EE": False, "Ve": False}
FONT_JOINED = {"BR", "BI", "IB", "IR", "RB", "RI"}
FONT_SPACED = {"B", "I", "SM", "SB", "nop"}
# mdoc(7) macro names that may appear as arguments of other mdoc macros: not text.
MDOC_CALLABLE = set(
    "Ac Ad An Ao Ap Aq Ar At Bc Bo Bq Brc Bro Brq Bsx Bx Cd Cm Dc Do Dq Dv Dx Ec Em En Eo Er Es "
    "Ev Fa Fc Fl Fn Fo Fr Ft Fx Hf Ic In Lb Li Lk Ms Mt Nm No Ns Nx Oc Oo Op Ox Pa Pc Pf Po Pq "
    "Qc Ql Qo Qq Sc So Sq St Sx Sy Ta Tn Ux Va Vt Xc Xo Xr".split()
)


def mdoc_text(name: str, args: list[str], page_name: str) -> str:
    """Rough text of an mdoc(7) line: callable macro names dropped, flags, quotes and brackets
    kept."""
    if name == "Xr" and len(args) >= 2:
        return f"{unescape(args[0])}({unescape(args[1])})" + "".join(args[2:])
    words, dash, glue = [], False, False
    items = [name, *args]
    for i, a in enumerate(items):
        if a in MDOC_CALLABLE:
            dash, glue = a == "Fl", glue or a in ("Ns", "Pf")
            following = items[i + 1] if i + 1 < len(items) else ""
            if a == "Nm" and (not following or following in MDOC_CALLABLE):
                words.append(page_name)
            continue
        a = ("-" if dash else "") + unescape(a)
        if glue and words:
            words[-1] += a
        else:
            words.append(a)
        dash = glue = False
    text = " ".join(w for w in words if w)
    if "Op" in items:
        return f"[{text}]"
    quotes = {"Dq": "\u201c{}\u201d", "Qq": '"{}"', "Sq": "\u2018{}\u2019", "Pq": "({})"}
    return quotes[name].format(text) if name in quotes else text


class RoffConverter:
    """One page's roff source to plain text; see the module docstring for what it ignores."""

    def __init__(self) -> None:
        self.out = Writer()
        self.skip_until = ""  # ".." after .de / .ig, ".EN" after .EQ
        self.braces = 0  # depth of a skipped \{ ... \} conditional block
        self.table = 0  # 0: no table, 1: tbl options/format lines, 2: tbl data
        self.tab = "\t"
        self.mdoc_name = ""
        self.url = ""

    def convert(self, source: str) -> str:
        for line in source.splitlines():
            self.line(line)
        return self.out.result()

    def line(self, line: str) -> None:
        if self.braces:
            self.braces += line.count("\\{") - line.count("\\}")
            self.braces = max(self.braces, 0)
        elif self.skip_until:
            if line.strip() in (self.skip_until, "." + self.skip_until):
                self.skip_until = ""
        elif self.table and self.table_line(line):
            pass
        elif line[:1] in (".", "'"):
            self.control(line[1:].lstrip(" \t"))
        elif not line.strip():
            self.out.para()
        else:
            if line[0] in " \t" and not self.out.nofill:
                self.out.br()  # a line starting with space breaks the filled line
            self.out.text(unescape(line))

    def table_line(self, line: str) -> bool:
        """tbl: skip options and format lines, keep data cells; True if the line was used."""
        if line.startswith(".TE"):
            self.table = 0
            self.out.para()
            return True
        if self.table == 1:
            if m := re.search(r"tab\s*\((.)\)", line):
                self.tab = m.group(1)
            self.table = 2 if line.rstrip().endswith(".") else 1
            return True
        if line[:1] in (".", "'"):
            return False
        cells = [c for c in line.replace("T{", "").replace("T}", "").split(self.tab)]
        if line.strip() not in ("_", "=", ""):
            self.out.text(unescape(" ".join(c.strip() for c in cells if c.strip())))
            self.out.br()
        return True

    def control(self, body: str) -> None:
        if body.startswith(('\\"', "\\#")) or not body:
            return
        name, _, rest = body.partition(" ")
        name, rest = name.split("\t")[0], rest.strip()
        if "\\{" in body:
            self.braces = max(body.count("\\{") - body.count("\\}"), 0)
        elif name in ("de", "de1", "am", "ig"):
            self.skip_until = ".."
        elif name == "EQ":
            self.skip_until = ".EN"
        elif name == "TS":
            self.table, self.tab = 1, "\t"
            self.out.para()
        else:
            self.macro(name, split_args(COMMENT.sub("", rest)))

    def macro(self, name: str, args: list[str]) -> None:
        out = self.out
        if name in ("SH", "SS", "Sh", "Ss"):
            out.para()
            out.text(unescape(" ".join(args)))
            out.para()
        elif name in PARA:
            out.para()
        elif name in BREAK:
            out.br()
        elif name in NOFILL:
            out.br()
            out.nofill = NOFILL[name]
        elif name in ("TP", "TQ"):
            out.para() if name == "TP" else out.br()
            out.tag = True
        elif name in ("IP", "It"):
            out.para() if name == "IP" else out.br()
            if args:
                text = mdoc_text("", args, self.mdoc_name) if name == "It" else args[0]
                out.text(unescape(text) if name == "IP" else text)
                out.br()
        elif name in FONT_JOINED:
            out.text(unescape("".join(args)))
        elif name in FONT_SPACED:
            out.text(unescape(" ".join(args)))
        elif name == "Nm":  # the first mdoc .Nm names the page
            self.mdoc_name = self.mdoc_name or (unescape(args[0]) if args else "")
            out.text(mdoc_text(name, args, self.mdoc_name))
        elif name in ("UR", "MT"):
            self.url = unescape(args[0]) if args else ""
        elif name in ("UE", "ME"):
            out.text(f"<{self.url}>" + unescape("".join(args)))
        elif name == "SY":
            out.para()
            out.text(unescape(" ".join(args)))
        elif name == "OP":
            out.text("[" + unescape(" ".join(args)) + "]")
        elif name == "Nd":
            out.text("\u2014 " + unescape(" ".join(args)))
        elif len(name) in (2, 3) and name[:1].isupper() and name in MDOC_CALLABLE | {"Dq"}:
            out.text(mdoc_text(name, args, self.mdoc_name))
        # anything else is a request (.TH, .ft, .ds, .nr, .IX, .so, ...) or a macro with no text


def roff_to_text(source: str) -> str:
    return RoffConverter().convert(source)


# --------------------------------------------------------------------------------------------
# HTML -> text

BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr",
         "table", "ul", "ol", "dl", "blockquote", "pre", "br", "hr", "figure", "figcaption",
         "caption", "th", "td"}  # fmt: skip
PRE_HIDE = str.maketrans({" ": "\x02", "\t": "\x03", "\n": "\x04"})
PRE_SHOW = str.maketrans({"\x02": " ", "\x03": "\t", "\x04": "\n"})
SKIP = {"script", "style", "nav", "header", "footer", "noscript", "form", "button", "head"}


class BodyText(HTMLParser):
    """Text of a Sphinx page's main body (<div role="main">), or of <body> without navigation."""

    def __init__(self, has_main: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.inside = 0 if has_main else 1  # div depth inside the main body; 0: outside it
        self.has_main = has_main
        self.skip: list[str] = []  # open elements whose text is dropped
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self.has_main and tag == "div":
            if self.inside:
                self.inside += 1
            elif a.get("role") == "main":
                self.inside = 1
        if self.skip or tag in SKIP or "headerlink" in (a.get("class") or ""):
            if tag not in ("br", "hr", "img", "meta", "link", "input", "wbr"):
                self.skip.append(tag)
            return
        if tag in BLOCK:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4") else "\n")
        self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if self.has_main and tag == "div" and self.inside:
            self.inside -= 1
        if tag == "pre":
            self.pre = max(self.pre - 1, 0)
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.inside and not self.skip:
            # Preformatted whitespace hides behind stand-ins while block breaks are tidied.
            self.parts.append(data.translate(PRE_HIDE) if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        text = re.sub(r" *\n *", "\n", "".join(self.parts))
        text = re.sub(r"\n{3,}", "\n\n", text).strip().translate(PRE_SHOW)
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        return re.sub(r"\n{3,}", "\n\n", text)


def html_to_text(source: str) -> str:
    parser = BodyText(has_main='role="main"' in source)
    parser.feed(source)
    parser.close()
    return parser.text()


# --------------------------------------------------------------------------------------------
# corpus


def convert(page: Page) -> str:
    """Plain text of one page ("" when it is a redirection or a stub)."""
    if page.kind == "html":
        return html_to_text(Path(page.path).read_text(encoding="utf-8", errors="replace"))
    raw = Path(page.path).read_bytes()
    if page.path.endswith(".gz"):
        raw = gzip.decompress(raw)
    source = raw.decode("utf-8", errors="replace")
    if source.lstrip().startswith(".so "):
        return ""
    text = roff_to_text(source)
    return text if len(text) >= MIN_DOC_CHARS else ""


@dataclass
class LangStats:
    documents: int = 0
    bytes: int = 0
    duplicates: int = 0
    empty: int = 0


def write_language(
    out_dir: Path, lang: str, pages: list[Page], texts: Iterable[str], usage: dict
) -> LangStats:
    """OUT_DIR/<lang>.jsonl; `usage[package][lang]` gathers [documents, bytes] for SOURCES.md."""
    stats, seen = LangStats(), set()
    with open(out_dir / f"{lang}.jsonl", "w", encoding="utf-8") as f:
        for page, text in zip(pages, texts, strict=True):
            digest = hashlib.sha1(text.encode("utf-8")).digest()
            if not text:
                stats.empty += 1
                continue
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            f.write(json.dumps({"text": text, "lang": lang, "source": page.path}) + "\n")
            size = len(text.encode("utf-8"))
            stats.documents += 1
            stats.bytes += size
            counts = usage[page.package].setdefault(lang, [0, 0])
            counts[0] += 1
            counts[1] += size
    return stats


# --------------------------------------------------------------------------------------------
# SOURCES.md

LICENCE_HINTS = [
    (r"GNU (?:Library|Lesser) General Public License", "LGPL"),
    (r"GNU General Public License", "GPL"),
    (r"GNU Free Documentation License", "GFDL"),
    (r"Apache License", "Apache"),
    (r"PYTHON SOFTWARE FOUNDATION LICENSE|Python License", "PSF"),
    (r"Permission is hereby granted, free of charge", "MIT/X11-style"),
    (r"Redistribution and use in source and binary forms", "BSD-style"),
    (r"Permission to use, copy, modify,? and(?:/or)? distribute", "ISC/HPND-style"),
    (r"hereby grant permission to use, copy, modify", "Tcl-style"),
    (r"Artistic License", "Artistic"),
    (r"[Pp]ublic [Dd]omain", "public domain"),
    (r"same license as the original", "each page under its original's licence"),
]


def licence_summary(package: str) -> str:
    """The License: short names of a DEP-5 copyright file, or the licences its text names."""
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no copyright file"
    names = Counter(
        m.group(1).strip()
        for m in re.finditer(r"^License:[ \t]*(\S.*)$", text, re.M)
        if len(m.group(1).split()) <= 6 and "," not in m.group(1)  # a name, not licence text
    )
    if names:
        top = [n for n, _ in names.most_common()]
        more = f" and {len(top) - 6} more" if len(top) > 6 else ""
        return ", ".join(top[:6]) + more
    hints = [label for pattern, label in LICENCE_HINTS if re.search(pattern, text)]
    named = ", ".join(hints) or "no licence by name: read the file"
    return f"not machine-readable; mentions {named}"


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Version}\n", *packages],
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def write_sources(
    out_dir: Path, usage: dict, skipped: Counter, langs: list[str], small: list[str]
) -> None:
    versions = package_versions(sorted(usage))
    total = sum(b for per in usage.values() for _, b in per.values())
    lines = [
        "# Sources of the Debian text corpus",
        "",
        "Built by `benchmarks/debian_corpus.py` from files the packages below installed on the "
        "machine (licences summarised from `/usr/share/doc/<package>/copyright`: the short names "
        "of its `License:` fields, or, when the file is not machine-readable, the licences its "
        "text names; read the file for the terms). Roff was converted by a simple stripper, not "
        "by man(1): expect leftovers.",
        "",
        f"Languages written: {', '.join(langs)}. Text in all: {total:,} bytes.",
        "",
        "Pages left out: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ".",
        "",
        f"Languages under --min-bytes, not written: {', '.join(small) or 'none'}.",
        "",
        "| package | version | licence | documents | text bytes | languages |",
        "|---|---|---|---:|---:|---|",
    ]
    order = sorted(usage, key=lambda p: -sum(b for _, b in usage[p].values()))
    for pkg in order:
        per = usage[pkg]
        docs, size = sum(d for d, _ in per.values()), sum(b for _, b in per.values())
        lines.append(
            f"| {pkg} | {versions.get(pkg, '?')} | {licence_summary(pkg)} | {docs:,} | "
            f"{size:,} | {', '.join(sorted(per))} |"
        )
    (out_dir / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------


def build(out_dir: Path, min_bytes: int, workers: int, exclude: set[str]) -> dict[str, LangStats]:
    out_dir.mkdir(parents=True, exist_ok=True)
    pages, skipped = find_pages(exclude)
    by_lang: dict[str, list[Page]] = defaultdict(list)
    for page in pages:
        by_lang[page.lang].append(page)
    print(f"pages: {len(pages):,} in {len(by_lang)} languages; left out: {dict(skipped)}")
    usage: dict[str, dict[str, list[int]]] = defaultdict(dict)
    stats, small = {}, []
    with get_context("fork").Pool(workers) as pool:
        for lang in sorted(by_lang):
            started = time.monotonic()
            texts = pool.imap(convert, by_lang[lang], chunksize=16)
            lang_usage: dict[str, dict[str, list[int]]] = defaultdict(dict)
            s = write_language(out_dir, lang, by_lang[lang], texts, lang_usage)
            kept = s.bytes >= min_bytes
            if kept:
                stats[lang] = s
                for pkg, per in lang_usage.items():
                    usage[pkg].update(per)
            else:
                os.remove(out_dir / f"{lang}.jsonl")
                small.append(f"{lang} ({s.documents} documents, {s.bytes:,} bytes)")
            print(
                f"{lang}: {s.documents:,} documents, {s.bytes / 1e6:.2f} MB, {s.duplicates} "
                f"duplicates, {s.empty} empty/redirects, {time.monotonic() - started:.1f} s"
                + ("" if kept else " (under --min-bytes: not written)"),
                flush=True,
            )
    with open(out_dir / "all.jsonl", "wb") as f:
        for lang in sorted(stats):
            f.write((out_dir / f"{lang}.jsonl").read_bytes())
    write_sources(out_dir, usage, skipped, sorted(stats), small)
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument(
        "--min-bytes",
        type=int,
        default=1_000_000,
        help="leave out languages with less text than this (default 1 MB)",
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--exclude-packages", nargs="*", default=list(DEFAULT_EXCLUDE))
    args = ap.parse_args(argv)
    started = time.monotonic()
    stats = build(args.out_dir, args.min_bytes, args.workers, set(args.exclude_packages))
    total = sum(s.bytes for s in stats.values())
    for lang, s in sorted(stats.items(), key=lambda kv: -kv[1].bytes):
        print(f"size {lang}: {s.bytes / 1e6:.2f} MB ({s.bytes / total:.1%}), {s.documents:,} docs")
    print(f"size all: {total / 1e6:.2f} MB, {sum(s.documents for s in stats.values()):,} docs")
    print(f"wall time: {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
