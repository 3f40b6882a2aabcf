"""Ingest: files -> documents -> chunks of about 200 word pieces that the encoder sees whole.

A *document* is the text extracted from one file plus its sections (character spans under a heading):

  .txt / .md   the file's text verbatim; Markdown `#` headings (and `#` lines in .txt) open sections
  .html/.htm   visible text (script/style dropped, block tags become line breaks); <h1>-<h6> open sections
  .jsonl       one record per line; the text is the first of `text`, `content`, `body`, `passage`,
               `document`; the heading is `title` / `heading` / `id` / `_id`; records are joined by a blank line

Character offsets always index `Document.text` (for .txt and .md that is the file itself).

A *chunk* is a run of whole sentences inside one section. The model truncates at 256 word pieces including
[CLS] and [SEP], so a chunk's embedded text -- its heading path, a newline, then its body -- is never over 254
pieces: anything past the limit would be silently ignored by the encoder. Sentences are packed greedily up to
the 200-piece target (a chunk under half the target may grow to the hard limit rather than end tiny); a
sentence longer than the limit is cut at word boundaries. Consecutive chunks of a section overlap by up to
~30 pieces of whole trailing sentences, so a fact straddling a boundary is whole in at least one chunk.

Counting is exact and cheap: BERT's pre-tokenizer never lets a word piece cross whitespace or punctuation, so
the piece count of a span is the number of token start offsets inside it, from one tokenisation of the
document.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from .encoder import load_wordpiece

SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".jsonl"}
TARGET_TOKENS = 200
LIMIT_TOKENS = 254  # 256 minus [CLS] and [SEP]
OVERLAP_TOKENS = 30
HEADING_TOKENS = 40  # a heading path longer than this is cut so the body keeps most of the budget
TEXT_FIELDS = ("text", "content", "body", "passage", "document")
TITLE_FIELDS = ("title", "heading", "id", "_id")


class Skipped(Exception):
    """A file that cannot be ingested; str(e) is the reason shown to the user."""


@dataclass
class Section:
    start: int
    end: int
    heading: str


@dataclass
class Document:
    source: str
    text: str
    sections: list[Section]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Chunk:
    source: str
    heading: str
    start: int  # char offsets into the document text
    end: int
    text: str
    n_tokens: int  # word pieces of `embed_text`, without [CLS]/[SEP]

    @property
    def embed_text(self) -> str:
        """What the encoder sees: the heading gives a bare paragraph its topic."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.embed_text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- reading files

def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Skipped(f"unreadable: {e.strerror or e}") from None
    if b"\x00" in raw[:8192]:
        raise Skipped("binary file (NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Skipped(f"not UTF-8 text (byte {e.start})") from None


_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _heading_sections(text: str, marks: list[tuple[int, int, int, str]]) -> list[Section]:
    """Sections from (heading start, body start, level, title) marks; a heading path is 'H1 > H2 > ...'.

    The heading line itself is left out of the section body: it travels in `Chunk.heading` instead.
    """
    sections, stack, pos, path = [], [], 0, ""
    for off, body, level, title in marks:
        if off > pos:
            sections.append(Section(pos, off, path))
        stack = [s for s in stack if s[0] < level] + [(level, title.strip())]
        path = " > ".join(t for _, t in stack)
        pos = body
    sections.append(Section(pos, len(text), path))
    return [s for s in sections if text[s.start:s.end].strip()]


def _read_markdown(source: str, text: str) -> Document:
    marks, in_fence = [], False
    for m in re.finditer(r"^.*$", text, re.M):
        line = m.group(0)
        if line.lstrip().startswith("```"):
            in_fence = not in_fence  # a '#' inside a code block is a comment, not a heading
        elif not in_fence and (h := _MD_HEADING.match(line)):
            marks.append((m.start(), m.end(), len(h.group(1)), h.group(2)))
    return Document(source, text, _heading_sections(text, marks))


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "table", "ul", "ol", "section", "article", "header", "footer",
             "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dt", "dd", "hr", "title"}
    HIDDEN = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.hidden = 0
        self.marks: list[tuple[int, int, int, str]] = []
        self.heading: tuple[int, int, list[str]] | None = None

    def _emit(self, s: str) -> None:
        self.parts.append(s)
        self.size += len(s)

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self._emit("\n")
            if re.fullmatch(r"h[1-6]", tag):
                self.heading = (self.size, int(tag[1]), [])
        elif tag in ("td", "th"):
            self._emit(" | ")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            if self.heading and re.fullmatch(r"h[1-6]", tag):
                off, level, words = self.heading
                self._emit("\n")
                self.marks.append((off, self.size, level, " ".join("".join(words).split())))
                self.heading = None
            else:
                self._emit("\n")

    def handle_data(self, data):
        if self.hidden:
            return
        data = re.sub(r"\s+", " ", data)
        if data.strip() or (self.parts and not self.parts[-1].endswith((" ", "\n"))):
            self._emit(data)
            if self.heading:
                self.heading[2].append(data)


def _read_html(source: str, raw: str) -> Document:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    text = "".join(p.parts)
    return Document(source, text, _heading_sections(text, p.marks))


def _read_jsonl(source: str, raw: str) -> Document:
    parts, sections, warnings, pos = [], [], [], 0
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            warnings.append(f"{source}:{n}: not JSON ({e.msg})")
            continue
        body = next((rec[f] for f in TEXT_FIELDS if isinstance(rec, dict) and isinstance(rec.get(f), str)), None)
        if not body or not body.strip():
            warnings.append(f"{source}:{n}: no text field (one of {', '.join(TEXT_FIELDS)})")
            continue
        title = next((str(rec[f]) for f in TITLE_FIELDS if rec.get(f) not in (None, "")), f"record {n}")
        if parts:
            parts.append("\n\n")
            pos += 2
        parts.append(body)
        sections.append(Section(pos, pos + len(body), title))
        pos += len(body)
    return Document(source, "".join(parts), sections, warnings)


def read_document(path: str | Path) -> Document:
    """Extract text and sections from one file; raises Skipped with the reason when it cannot."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise Skipped(f"unsupported type {suffix or '(none)'} (supported: {', '.join(sorted(SUFFIXES))})")
    raw = _decode(path)
    source = str(path.resolve())
    if suffix in (".html", ".htm"):
        doc = _read_html(source, raw)
    elif suffix == ".jsonl":
        doc = _read_jsonl(source, raw)
    else:
        doc = _read_markdown(source, raw)
    if not doc.text.strip():
        raise Skipped("no text" + (f" ({doc.warnings[0]})" if doc.warnings else ""))
    return doc


def collect_files(paths: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively, hidden entries skipped) -> (files, [(path, reason skipped)])."""
    files, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if any(part.startswith(".") for part in f.relative_to(p).parts) or not f.is_file():
                    continue
                if f.suffix.lower() in SUFFIXES:
                    files.append(f)
                else:
                    skipped.append((str(f), f"unsupported type {f.suffix or '(none)'}"))
        elif p.is_file():
            files.append(p)
        else:
            skipped.append((str(p), "no such file or folder"))
    return files, skipped


# ------------------------------------------------------------------------------------------------- chunking

_BREAK = re.compile(
    r"\n[ \t]*\n"  # paragraph
    r"|\n(?=[ \t]*(?:[-*+]|\d+[.)]|\|)[ \t])"  # list item or table row starts a unit
    r"|(?<=[.!?])[\"')\]]*[ \t\n]+(?=[\"'(\[]?[A-Z0-9])"  # sentence end
)


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, pos = [], start
    for m in _BREAK.finditer(text, start, end):
        spans.append((pos, m.start() if m.group(0).startswith("\n") else m.start() + len(m.group(0).rstrip())))
        pos = m.end()
    spans.append((pos, end))
    out = []
    for s, e in spans:  # trim whitespace so spans are tight and adjacent text between them is blank
        seg = text[s:e]
        ls, rs = len(seg) - len(seg.lstrip()), len(seg.rstrip())
        if rs > ls:
            out.append((s + ls, s + rs))
    return out


class TokenCounter:
    """Word-piece counts of spans of one text, from a single tokenisation."""

    def __init__(self, tokenizer, text: str):
        self.offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        self.starts = [s for s, _ in self.offsets]

    def count(self, start: int, end: int) -> int:
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)

    def split(self, start: int, end: int, limit: int, text: str) -> list[tuple[int, int]]:
        """Cut [start, end) into pieces of <= limit tokens, preferring cuts at whitespace."""
        i0, i1 = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        out, i = [], i0
        while i < i1:
            j = min(i + limit, i1)
            if j < i1:  # back off to the last word boundary in the second half of the window
                for k in range(j, i + limit // 2, -1):
                    if text[self.offsets[k - 1][1]:self.offsets[k][0]].isspace():
                        j = k
                        break
            out.append((self.offsets[i][0], self.offsets[j - 1][1]))
            i = j
        return out


_TOKENIZER = None


def counting_tokenizer():
    """The encoder's WordPiece tokenizer without truncation, loaded once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = load_wordpiece(max_tokens=None)
    return _TOKENIZER


def chunk_document(doc: Document, tokenizer=None, target: int = TARGET_TOKENS, limit: int = LIMIT_TOKENS,
                   overlap: int = OVERLAP_TOKENS) -> list[Chunk]:
    """Split a document into chunks whose embed_text is at most `limit` word pieces."""
    tok = tokenizer or counting_tokenizer()
    counter = TokenCounter(tok, doc.text)
    chunks: list[Chunk] = []
    for sec in doc.sections:
        heading = sec.heading
        h_tok = len(tok.encode(heading, add_special_tokens=False).ids) if heading else 0
        if h_tok > HEADING_TOKENS:
            offs = tok.encode(heading, add_special_tokens=False).offsets
            heading = heading[:offs[HEADING_TOKENS - 1][1]]
            h_tok = HEADING_TOKENS
        budget = limit - h_tok
        goal = min(target, budget)
        units: list[tuple[int, int, int]] = []  # (start, end, tokens), each unit <= budget
        for s, e in _sentences(doc.text, sec.start, sec.end):
            n = counter.count(s, e)
            if n <= budget:
                units.append((s, e, n))
            else:
                units += [(a, b, counter.count(a, b)) for a, b in counter.split(s, e, budget, doc.text)]
        i = 0
        while i < len(units):
            j, total = i, 0
            while j < len(units) and (total + units[j][2] <= goal or
                                      (total < goal // 2 and total + units[j][2] <= budget)):
                total += units[j][2]
                j += 1
            j = max(j, i + 1)  # a unit is never over budget, so this only guards zero-token units
            s, e = units[i][0], units[j - 1][1]
            body = doc.text[s:e]
            chunks.append(Chunk(doc.source, heading, s, e, body, h_tok + counter.count(s, e)))
            if j >= len(units):
                break
            # step back over trailing whole units worth <= overlap tokens, but always move forward
            k, back = j, 0
            while k - 1 > i and back + units[k - 1][2] <= overlap:
                k -= 1
                back += units[k][2]
            i = k
    return chunks


def chunk_file(path: str | Path, tokenizer=None) -> tuple[Document, list[Chunk]]:
    """read_document + chunk_document; raises Skipped when the file cannot be ingested."""
    doc = read_document(path)
    return doc, chunk_document(doc, tokenizer)
