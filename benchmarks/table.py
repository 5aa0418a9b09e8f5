"""The benchmarks' printed tables: rows of cells (numbers already formatted as they should read) as one markdown
table, ready to paste into benchmarks/README.md. Written here because pandas' `to_markdown` needs `tabulate`, which
the project does not otherwise install."""


def markdown(rows: list[dict]) -> str:
    """A header from the first row's keys; the first column left-aligned, the others right-aligned."""
    head = list(rows[0])
    width = {k: max(len(k), *(len(str(row[k])) for row in rows)) for k in head}
    align = lambda k, text: text.ljust(width[k]) if k == head[0] else text.rjust(width[k])
    line = lambda cells: "| " + " | ".join(cells) + " |"
    rule = "|" + "|".join("-" * (width[k] + 1) + ("-" if k == head[0] else ":") for k in head) + "|"
    return "\n".join([line(align(k, k) for k in head), rule, *(line(align(k, str(row[k])) for k in head)
                                                                for row in rows)])
