"""The report's writers: Markdown (the block list as text) and a self-contained HTML page.

HTML goes through markdown-it-py (CommonMark with tables, raw HTML off, so user text in labels, errors
and the notes can never inject markup; its link validation drops ``javascript:`` URLs). What is our own:
table cells get a ``num`` class and frontier rows a highlight, figures are inlined as base64 PNGs, and the
person-written notes' headings sit one level below the report's own.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping

from markdown_it import MarkdownIt

from hyperquant.tradeoff.document import Doc


def to_markdown(doc: Doc) -> str:
    out: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "code":
            fence = "````" if "```" in block[1] else "```"
            out.append(f"{fence}\n{block[1]}\n{fence}")
        elif kind == "table":
            headers, rows, numeric = block[1], block[2], block[3]
            lines = ["| " + " | ".join(headers) + " |",
                     "|" + "|".join("---:" if j in numeric else "---" for j in range(len(headers))) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[3]}*")
        elif kind == "md":
            out.append(block[1].strip())
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #1d2430;
       max-width: 1320px; margin: 24px auto; padding: 0 24px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.7em; border-bottom: 2px solid #2b6cb0; padding-bottom: 6px; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d5dbe3; padding-bottom: 4px; }
h3 { font-size: 1.08em; margin-top: 1.3em; }
code { background: #f1f3f6; padding: 1px 4px; border-radius: 3px; font-size: 0.92em; }
pre { background: #f1f3f6; padding: 10px 12px; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; }
pre code { background: none; padding: 0; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.88em; }
th, td { border: 1px solid #d5dbe3; padding: 4px 7px; text-align: left; vertical-align: top;
         white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #eef2f7; white-space: normal; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
tr.hl td { background: #e6f4ea; }
figure { margin: 18px 0; }
figure img { max-width: 100%; border: 1px solid #e2e6ec; }
figcaption { color: #4a5565; font-size: 0.9em; margin-top: 4px; max-width: 1100px; }
blockquote { border-left: 3px solid #d5dbe3; margin-left: 0; padding-left: 12px; color: #4a5565; }
.meta { color: #4a5565; }
"""



def _markdown_it(images: Mapping[str, bytes], heading_shift: int = 0) -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_image = md.renderer.rules.get("image")

    def image(_renderer, tokens, idx, options, env):
        token = tokens[idx]
        src = token.attrGet("src")
        if src in images:  # a figure of this report: inline, so the page has no external resources
            token.attrSet("src", "data:image/png;base64," + base64.b64encode(images[src]).decode())
        return default_image(tokens, idx, options, env)

    def heading_open(_renderer, tokens, idx, options, env):
        level = min(6, int(tokens[idx].tag[1]) + heading_shift)
        return f"<h{level}>"

    def heading_close(_renderer, tokens, idx, options, env):
        level = min(6, int(tokens[idx].tag[1]) + heading_shift)
        return f"</h{level}>\n"

    md.add_render_rule("image", image)
    if heading_shift:
        md.add_render_rule("heading_open", heading_open)
        md.add_render_rule("heading_close", heading_close)
    return md


def to_html(doc: Doc, images: Mapping[str, bytes], title: str) -> str:
    md = _markdown_it(images)
    notes = _markdown_it(images, heading_shift=1)  # notes sit under the report's own headings
    inline = md.renderInline
    body: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{inline(t)}</li>" for t in block[1]) + "</ul>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "table":
            headers, rows, numeric, highlight = block[1:]

            def cls(j: int, numeric: set[int] = numeric) -> str:
                return ' class="num"' if j in numeric else ""

            t = ["<table>", "<tr>" + "".join(f"<th{cls(j)}>{inline(h)}</th>" for j, h in enumerate(headers)) + "</tr>"]
            for r, row in enumerate(rows):
                tr = '<tr class="hl">' if r in highlight else "<tr>"
                t.append(tr + "".join(f"<td{cls(j)}>{inline(c)}</td>" for j, c in enumerate(row)) + "</tr>")
            body.append('<div class="scroll">' + "\n".join(t) + "</table></div>")
        elif kind == "img":
            file, alt, caption = block[1:]
            if file in images:
                data = base64.b64encode(images[file]).decode()
                body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{inline(caption)}</figcaption></figure>")
        elif kind == "md":
            body.append(notes.render(block[1]))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
