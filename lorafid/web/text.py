"""Words for the page, and untrusted text made safe to show in them.

Repo IDs, tensor names and error messages come from repos and visitors: ``cut`` bounds
what is echoed, ``md_text`` and ``code_span`` keep it literal in Markdown, ``html_text`` in
HTML pop-ups. ``summary_markdown`` is the summary card of a report, built with them. Free
of Gradio; it computes no metric (the report's summary does).
"""

from __future__ import annotations

import html
import re

from lorafid.audit.report import Report


def summary_markdown(report: Report) -> str:
    """The summary card: one sentence, then the numbers behind it.

    Every name in it comes from a repo or a user, so each is quoted with ``code_span``: a
    tensor named ``[Sign in](https://…)`` shows as those characters, never as a link.
    """
    if not report.matrices:
        if report.status == "complete" or not report.pending:
            return "**No weight matrix was compared:** this audit has no results."
        return "Waiting for the first matrix…"
    s = report.summary()
    done, planned = len(report.matrices), len(report.matrices) + len(report.pending)
    pins = (
        f"Base {code_span(_pinned(report.base.spec, report.base.resolved_sha))} · "
        f"fine-tune {code_span(_pinned(report.finetune.spec, report.finetune.resolved_sha))}"
    )
    changed = sum(1 for m in report.matrices if m.energy > 0)
    if changed == 0:
        return "\n".join([f"**{md_text(s.sentence())}**", "", _unchanged_line(report), "", pins])
    vector_share = s.lost_outside_lora / (s.overall.energy + s.lost_outside_lora) if s.lost_outside_lora else 0.0
    rank_90 = "beyond full rank" if s.rank_for_90 is None else str(s.rank_for_90)
    lines = [
        f"**{md_text(s.sentence())}**",
        "",
        "| at rank " + str(s.rank) + " | |",
        "|---|---|",
        f"| energy of Δ retained (all matrices) | {s.overall.energy_retained:.2%} |",
        f"| cosine distance (all matrices as one) | {s.overall.cosine_distance:.4f} |",
        f"| served weight vs fine-tune (relative error) | {s.overall.weight_rel_error:.3g} |",
        f"| storage rounding in Δ, estimated (no rank recovers it) | {1.0 - s.noise_floor_retained:.2%} |",
        f"| rank needed for 90% | {rank_90} |",
        f"| Δ energy in 1-D tensors (never in a LoRA) | {vector_share:.2%} |",
        f"| matrices changed | {changed} of {done}{'' if changed == done else ' (the rest are identical)'} |",
        f"| matrices | {done} of {planned}{'' if report.status == 'complete' else ' (partial)'} |",
        "",
        pins,
    ]
    if s.worst:
        name, distance = s.worst[0]
        lines.append(f" · worst matrix {code_span(name)} (cosine distance {distance:.4f})")
    return "\n".join(lines)


def _unchanged_line(report: Report) -> str:
    """What is true when no matrix differs: nothing for a LoRA to carry, or only 1-D tensors changed."""
    done = len(report.matrices)
    changed_vectors = sum(1 for v in report.vectors if v.energy > 0)
    if changed_vectors:
        return (
            f"All {done} compared weight matrices are identical in the two models; {changed_vectors} of "
            f"{len(report.vectors)} 1-D tensors (norms, biases) differ, and no LoRA can carry those."
        )
    return f"No weight differs: all {done} compared matrices and {len(report.vectors)} 1-D tensors are identical."


def _pinned(spec: str, sha: str | None) -> str:
    return f"{spec} @ {sha[:12]}" if sha else spec


MAX_ECHO_CHARS = 200
"""Longest piece of user or repo text quoted back in a message; the rest is cut, with its length."""

_ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def cut(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Untrusted text short enough to echo: a 20 MB repo ID must not come back as a 20 MB message.

    Example: cut("a" * 1000, 5) -> "aaaaa… (1,000 characters)".
    """
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def md_text(text: str, limit: int | None = None) -> str:
    """Untrusted text as literal Markdown: links, emphasis, HTML and bare URLs stay characters.

    Every ASCII punctuation mark is backslash-escaped (CommonMark allows it for each of them),
    which also breaks autolinks ("https\\://…") and ``$`` maths; newlines become spaces so a
    name cannot start a heading or a table. Example: "[a](b)" -> "\\[a\\]\\(b\\)".
    """
    text = str(text) if limit is None else cut(text, limit)
    return _ASCII_PUNCTUATION.sub(r"\\\1", " ".join(text.splitlines()))


def code_span(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Untrusted text as an inline code span that no backtick inside it can close early.

    The fence is one backtick longer than the longest run inside (CommonMark), padded with a
    space when the text starts or ends with one. Example: "a`b" -> "``a`b``".
    """
    text = " ".join(cut(text, limit).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html_text(text: str, limit: int | None = None) -> str:
    """Untrusted text for HTML contexts (pop-ups): tags and entities shown, not interpreted."""
    return html.escape(str(text) if limit is None else cut(text, limit), quote=False)


_MD_LINK = re.compile(r"\[([^\]]*)\]\(((?:https?://|\?)[^)\s]*)\)")


def cards_html(headers: list[str], types: list[str], rows: list[list[object]]) -> str:
    """A table's rows as one card each, for a phone: the first cell as the card's title, then
    "header: value" lines (empty cells left out).

    Every cell is escaped first; in "markdown" cells only ``[text](https://…)`` and
    ``[text](?query)`` links (the ones ``lorafid.sharing.table`` writes, from validated repo IDs
    and SHAs) become ``<a>`` again, so a prober's host or model stays text.
    """

    def cell(value: object, kind: str) -> str:
        text = html.escape("" if value is None else str(value)).replace("\n", "<br>")
        if kind != "markdown":
            return text
        return _MD_LINK.sub(_link, text)

    cards = []
    for row in rows:
        title = cell(row[0], types[0])
        lines = [
            f"<div><b>{html.escape(h)}</b>: {cell(v, t)}</div>"
            for h, t, v in zip(headers[1:], types[1:], row[1:], strict=True)
            if v not in (None, "")
        ]
        cards.append(f'<div class="card"><div class="card-title">{title}</div>{"".join(lines)}</div>')
    return "".join(cards)


def _link(match: re.Match[str]) -> str:
    """An escaped Markdown link as an anchor: the Hub in a new tab, this page's own links here."""
    external = ' target="_blank" rel="noopener"' if match.group(2).startswith("http") else ""
    return f'<a href="{match.group(2)}"{external}>{match.group(1)}</a>'


def rounded(value: object, digits: int = 3) -> object:
    """A number as a table shows it: ``digits`` significant figures (0.0722, 3.66e-08); the rest
    (counts, text, None) as is. Tables print what the CLI prints, not 0.07215251209154244."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value
