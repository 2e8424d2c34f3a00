"""analysis/html.py: the markdown converter on what analysis.summary writes, and the self-contained page."""

from html.parser import HTMLParser
from pathlib import Path

import pytest

from analysis.html import (ReportFilesError, html_from_folder, image_data_uri, inline_html, main, markdown_to_html,
                           report_html)
from analysis.summary import markdown_table


class Page(HTMLParser):
    """Every tag with its attributes, and the text, of an HTML document."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]


def external_references(page: Page) -> list[str]:
    """src / href values that would load something from the network (anything but data: URIs and #anchors)."""
    return [value for _, attrs in page.tags for key, value in attrs.items()
            if key in ("src", "href") and not value.startswith(("data:", "#"))]


def test_inline_markup_is_escaped_and_code_stays_literal():
    assert inline_html("a < b & **not held**") == "a &lt; b &amp; <strong>not held</strong>"
    assert inline_html("*normal held* is the reference") == "<em>normal held</em> is the reference"
    assert inline_html("`tags.sophon.role = '*x*'` and <b>") == (
        "<code>tags.sophon.role = &#x27;*x*&#x27;</code> and &lt;b&gt;")
    assert inline_html("3 * 4 * 5") == "3 * 4 * 5"          # lone asterisks are not emphasis


def test_summary_markdown_becomes_headings_paragraphs_and_aligned_tables():
    table = markdown_table(["variant", "loss", "held (≤ scratch+1)", "drop"], [["ice", "klu", "8/8", "+1.5"]],
                           text_columns=2)
    text = (f"## Evaluation grid, restricted domain `shapes_m`\n\nFirst line\nsecond line.\n\n{table}\n\n"
            "### Cells\n\n- one\n- **two**\n\n### Cells\n")
    out = markdown_to_html(text)
    assert '<h2 id="evaluation-grid-restricted-domain-shapes-m">Evaluation grid, restricted domain ' \
           "<code>shapes_m</code></h2>" in out
    assert "<p>First line second line.</p>" in out
    assert ("<thead><tr><th>variant</th><th>loss</th><th class=\"r\">held (≤ scratch+1)</th><th class=\"r\">drop"
            "</th></tr></thead><tbody><tr><td>ice</td><td>klu</td><td class=\"r\">8/8</td><td class=\"r\">+1.5</td>"
            "</tr></tbody>") in out
    assert "<ul><li>one</li><li><strong>two</strong></li></ul>" in out
    assert '<h3 id="cells">Cells</h3>' in out and '<h3 id="cells-2">Cells</h3>' in out  # ids stay unique


def test_a_table_cell_may_hold_an_escaped_pipe_and_a_table_without_alignment_row_has_no_header():
    out = markdown_to_html("| a \\| b | c |\n| d | e |")
    assert "<thead>" not in out and "<td>a | b</td><td>c</td>" in out and "<td>d</td><td>e</td>" in out


def test_image_data_uri_embeds_the_bytes_and_refuses_non_images(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    assert image_data_uri(png) == "data:image/png;base64,iVBORw0KGgpmYWtl"
    with pytest.raises(ValueError, match="not an image"):
        image_data_uri(tmp_path / "summary.md")


def test_report_page_is_self_contained(tmp_path):
    png = tmp_path / "heatmap-direct-all.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    text = "# sweep x\n\n## Intactness (original domain)\n\n| a | b |\n|:---|---:|\n| 1 | 2 |\n"
    page = Page(report_html(text, {"heatmaps": [png]}))
    assert [a["src"][:22] for a in page.all("img")] == ["data:image/png;base64,"]
    assert not external_references(page) and not page.all("link") and not page.all("script")
    assert [a["href"] for a in page.all("a")] == ["#heatmaps", "#intactness-original-domain"]
    assert page.all("meta")[0] == {"charset": "utf-8"} and "sweep x" in page.text


def test_html_cli_rewrites_a_report_folder_and_names_the_fix_without_summary(tmp_path, capsys):
    (tmp_path / "summary.md").write_text("# t\n\nbody\n")
    (tmp_path / "curves-direct-all.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert html_from_folder(tmp_path) == tmp_path / "report.html"
    assert 'alt="curves-direct-all.png"' in (tmp_path / "report.html").read_text()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no summary.md in" in capsys.readouterr().err
    with pytest.raises(ReportFilesError):
        html_from_folder(Path(tmp_path / "nothing"))
