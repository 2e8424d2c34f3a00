"""One self-contained HTML page of a sweep's report: its figures (``analysis.contents.FIGURES``) embedded as
base64 ``data:`` URIs, then summary.md's sections (intactness, robustness per variant, best attacks, leaks, cells)
rendered from its markdown, with inline CSS only. Nothing is fetched from anywhere (no external CSS, JS, fonts or
images), so the file reads the same offline, attached to an e-mail or downloaded from MLflow.

The markdown converter covers what ``analysis.summary`` writes (headings, paragraphs, GitHub pipe tables with
their alignment row, ``- `` lists, inline code, bold and italic); it is not a general markdown implementation.

    python -m analysis.html runs/quickstart/report     # (re)write report.html from summary.md and the PNGs there
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import mimetypes
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from analysis import contents
from sophon_ray.errors import SophonError, cli_exit

log = logging.getLogger(__name__)
REPORT_HTML = "report.html"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 2rem auto; max-width: 1400px; padding: 0 1.5rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #e5e5e5; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin-top: 1.6rem; }
nav ul { columns: 2; padding-left: 1.2rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f3f3f3;
       padding: 0 .25em; border-radius: 3px; font-size: .92em; }
.table-wrap { overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: .88rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .55rem; white-space: nowrap; }
th { background: #f0f2f5; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafa; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
td.c, th.c { text-align: center; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e5e5; }
figcaption { color: #555; font-size: .85rem; }
footer { margin-top: 3rem; color: #777; font-size: .8rem; }
""".strip()


class ReportFilesError(SophonError, FileNotFoundError):
    """A report folder without the summary.md that report.html is made from; names the fix."""


def inline_html(text: str) -> str:
    """One line of markdown as escaped HTML: `code` (its content kept literal), **bold**, *italic*."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        escaped = html.escape(part)
        escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
        escaped = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", escaped)
        out.append(escaped)
    return "".join(out)


def slug(text: str) -> str:
    """An HTML id from a heading's text: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _cells(line: str) -> list[str]:
    """The cells of one pipe-table line (``\\|`` is a literal pipe)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body)]


_ITEM = re.compile(r"^\s*[-*] ")
_ALIGN_ROW = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _alignment(cell: str) -> str:
    """The CSS class of an alignment-row cell: ``r`` for ``---:``, ``c`` for ``:---:``, none for the rest."""
    if cell.endswith(":"):
        return "c" if cell.startswith(":") else "r"
    return ""


def table_html(lines: Sequence[str]) -> str:
    """A GitHub pipe table (header, alignment row, rows) as an HTML table in a horizontally scrolling box; lines
    without an alignment row as its second line become body rows only."""
    has_header = len(lines) >= 2 and bool(_ALIGN_ROW.match(lines[1]))
    align = [_alignment(c) for c in _cells(lines[1])] if has_header else []

    def row(cells: list[str], tag: str) -> str:
        out = []
        for i, cell in enumerate(cells):
            cls = align[i] if i < len(align) else ""
            attribute = f' class="{cls}"' if cls else ""
            out.append(f"<{tag}{attribute}>{inline_html(cell)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    head = f"<thead>{row(_cells(lines[0]), 'th')}</thead>" if has_header else ""
    body = "".join(row(_cells(line), "td") for line in (lines[2:] if has_header else lines))
    return f'<div class="table-wrap"><table>{head}<tbody>{body}</tbody></table></div>'


def markdown_to_html(text: str) -> str:
    """Markdown as written by ``analysis.summary`` to HTML: ``#``-``######`` headings (with unique ids), paragraphs
    (lines joined until a blank line), pipe tables, ``- `` lists; inline code, bold and italic in all of them.
    Every text is HTML-escaped."""
    blocks: list[str] = []
    lines = text.splitlines()
    paragraph: list[str] = []
    ids: dict[str, int] = {}

    def unique(anchor: str) -> str:
        ids[anchor] = ids.get(anchor, 0) + 1
        return anchor if ids[anchor] == 1 else f"{anchor}-{ids[anchor]}"

    def flush() -> None:
        if paragraph:
            blocks.append(f"<p>{inline_html(' '.join(line.strip() for line in paragraph))}</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not line.strip():
            flush()
        elif heading:
            flush()
            level, title = len(heading.group(1)), heading.group(2)
            blocks.append(f'<h{level} id="{unique(slug(title))}">{inline_html(title)}</h{level}>')
        elif line.lstrip().startswith("|"):
            flush()
            table = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                table.append(lines[i])
                i += 1
            blocks.append(table_html(table))
            continue
        elif _ITEM.match(line):
            flush()
            items = []
            while i < len(lines) and _ITEM.match(lines[i]):
                items.append(f"<li>{inline_html(_ITEM.sub('', lines[i]))}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
            continue
        else:
            paragraph.append(line)
        i += 1
    flush()
    return "\n".join(blocks)


def image_data_uri(path: str | Path) -> str:
    """The image file as a ``data:<type>;base64,...`` URI. Raises ValueError when its type is not an image."""
    kind, _ = mimetypes.guess_type(str(path))
    if not kind or not kind.startswith("image/"):
        raise ValueError(f"{path} is not an image file (type {kind})")
    return f"data:{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def figures_html(title: str, paths: Sequence[Path]) -> str:
    """An ``<h2>`` section with one embedded ``<figure>`` per image, captioned with its file name."""
    figures = [f'<figure><img src="{image_data_uri(p)}" alt="{html.escape(Path(p).name)}">'
               f"<figcaption>{html.escape(Path(p).name)}</figcaption></figure>" for p in paths]
    return f'<h2 id="{slug(title)}">{html.escape(title)}</h2>\n' + "\n".join(figures)


def report_html(summary_markdown: str, figures: Mapping[str, Sequence[Path]] = MappingProxyType({})) -> str:
    """The whole page: the summary's title, a contents list, one section per ``analysis.contents.FIGURES`` entry
    (in that order, titled by its ``section``; ``figures``: entry name -> its PNGs, empty ones left out), then the
    summary's sections. Every image is embedded; the only style is the inline ``<style>``."""
    lines = summary_markdown.splitlines()
    title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else "sophon-ray report"
    rest = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)
    body = markdown_to_html(rest)
    unknown = set(figures) - {figure.name for figure in contents.FIGURES}
    if unknown:
        known = [f.name for f in contents.FIGURES]
        raise ValueError(f"no report figure named {sorted(unknown)}; analysis.contents.FIGURES has {known}")
    sections = [(figure.section, figures[figure.name]) for figure in contents.FIGURES if figures.get(figure.name)]
    nav = "".join(f'<li><a href="#{slug(name)}">{html.escape(name)}</a></li>' for name, _ in sections) + "".join(
        f'<li><a href="#{anchor}">{heading}</a></li>'
        for anchor, heading in re.findall(r'<h2 id="([^"]*)">(.*?)</h2>', body))
    parts = [f"<h1>{html.escape(title)}</h1>", f"<nav><ul>{nav}</ul></nav>"]
    parts += [figures_html(name, paths) for name, paths in sections]
    parts += [body, "<footer>Written by sophon-ray (analysis/html.py) from the sweep's MLflow runs; self-contained: "
                    "every image is embedded, nothing is loaded from the network.</footer>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def write_html_report(summary_markdown: str, out_dir: str | Path,
                      figures: Mapping[str, Sequence[Path]] = MappingProxyType({})) -> Path:
    """Write ``report.html`` (``report_html``) into ``out_dir`` (created if missing) and return its path."""
    path = Path(out_dir) / REPORT_HTML
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(summary_markdown, figures), encoding="utf-8")
    log.info("wrote %s", path)
    return path


def html_from_folder(folder: str | Path) -> Path:
    """Rewrite ``report.html`` of a report folder from its summary.md and the PNGs there of every
    ``analysis.contents.FIGURES`` entry (found by its file patterns).

    Raises ReportFilesError when the folder has no summary.md."""
    root = Path(folder)
    summary = root / "summary.md"
    if not summary.is_file():
        raise ReportFilesError(f"no summary.md in {root}. Fix: pass a report folder (`sophon-ray report SPEC` "
                               "writes one to <output_dir>/report)")
    return write_html_report(summary.read_text(encoding="utf-8"), root,
                             {figure.name: figure.find(root) for figure in contents.FIGURES})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: (re)write report.html in a report folder; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m analysis.html", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a report folder (summary.md and the PNGs), e.g. runs/quickstart/report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def command() -> int:
        print(html_from_folder(args.folder))
        return 0

    return cli_exit(command)


if __name__ == "__main__":
    raise SystemExit(main())
