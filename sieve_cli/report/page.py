"""The report's HTML page: sections, tables and the sentences around the figures."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from ..units import count, file_size
from .read import Data, Score

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
 h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
 table {{ border-collapse: collapse; margin: .5em 0; }}
 td, th {{ padding: .25em .8em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }}
 td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
 img {{ max-width: 100%; display: block; margin: .5em 0; }}
 .note {{ color: #8a5a00; background: #fff6e0; padding: .4em .8em; border-radius: 4px; }}
 .finding {{ background: #eef5ff; padding: .6em 1em; border-radius: 4px; }}
 code, .opts {{ font: 12px/1.4 ui-monospace, monospace; }}
</style></head><body>
<h1>{title}</h1>
<p>Workspace <code>{root}</code>. Built from the files the stages wrote; nothing recomputed.</p>
{sections}
</body></html>
"""


def section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{html.escape(heading)}</h2>\n{body}\n</section>'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def image_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


NUMERIC = re.compile(r"[-+]?[\d.,]+( to [-+]?[\d.,]+)? ?(%|[KMB]|[KMG]iB|B)?")


def table(rows: list[tuple], header: tuple | None = None) -> str:
    def cell(value, tag="td"):
        klass = ' class="num"' if NUMERIC.fullmatch(str(value)) else ""
        return f"<{tag}{klass}>{html.escape(str(value))}</{tag}>"

    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def score_rows(scores: list[Score]) -> list[tuple]:
    def interval(s: Score) -> str:
        return f"{s.ci_low:.4g} to {s.ci_high:.4g}" if s.ci_low is not None and s.ci_high is not None else ""

    return [(s.label, f"{s.value:.4g}", interval(s), s.n or "") for s in scores]


def part_rows(scores: list[Score]) -> tuple[list[tuple], tuple]:
    """Dense beside the plan (and the healed plan, when evaluated) on each split part: search (what
    chose it), confirm (what checked it), test (what is reported). Returns (rows, header); a model
    not evaluated on a part is left blank there."""
    by_part: dict[str, dict[str, Score]] = {}
    for s in scores:
        who, _, part = s.label.partition(" (")
        who = {"pruned": "plan", "pruned healed": "healed"}.get(who, who)
        if part.endswith(" split)") and who in ("dense", "dense healed", "plan", "healed"):
            by_part.setdefault(part.removesuffix(" split)"), {})[who] = s
    healed = any("healed" in models for models in by_part.values())
    dense_healed = any("dense healed" in models for models in by_part.values())
    rows = []
    for part in ("search", "confirm", "test"):
        models = by_part.get(part, {})
        if not models:
            continue
        dense = models.get("dense")
        row = [part, *(_value(models.get(who)) for who in ("dense", "plan")), _change(dense, models.get("plan"))]
        if healed:
            row += [_value(models.get("healed")), _change(dense, models.get("healed"))]
        if dense_healed:  # what the same heal gives the dense model: the comparison a healed plan deserves
            row += [_value(models.get("dense healed")), _change(models.get("dense healed"), models.get("healed"))]
        rows.append((*row, next(iter(models.values())).n or ""))
    header = ("split part", "dense", "plan", "relative change")
    header += ("healed", "relative change") if healed else ()
    header += ("dense healed", "healed vs dense healed") if dense_healed else ()
    return rows, (*header, "examples")


def _value(score: Score | None) -> str:
    return "" if score is None else f"{score.value:.4g}"


def _change(dense: Score | None, other: Score | None) -> str:
    if dense is None or other is None or not dense.value:
        return ""
    return f"{(other.value - dense.value) / abs(dense.value):+.1%}"


def summary_rows(data: Data) -> list[tuple]:
    """Parameters and sizes: the plan's prediction, and what apply counted when it ran."""
    p, a = data.plan["params"], data.applied
    width = DTYPE_BYTES.get(data.dtype, 4)
    rows = [
        ("prunable parameters (plan)", count(p["prunable_before"]), count(p["prunable_after"]),
         f"-{p['removed_fraction_prunable']:.1%}"),
        ("model parameters (plan)", count(p["model_before"]), count(p["model_after"]),
         f"-{p['removed_fraction_model']:.1%}"),
    ]
    if a:
        rows += [
            ("model parameters (counted by apply)", count(a["params_before"]), count(a["params_after"]),
             f"-{a['removed_fraction_model']:.1%}" + _stored_dense(a)),
            (f"weights file ({a['dtype']})", file_size(a["dense_file_bytes"]), file_size(a["file_bytes"]),
             f"{a['size_ratio'] - 1:+.1%}"),
        ]
    else:
        after = file_size(data.pruned_bytes) if data.pruned_bytes else file_size(p["model_after"] * width)
        rows.append((f"weights in {data.dtype} (from the counts)", file_size(p["model_before"] * width), after, ""))
    return rows


def plan_sentence(plan: dict, threshold: float) -> str:
    metric = plan["metric"]
    kind = "absolute" if plan.get("absolute") else "relative to dense"
    search = plan.get("search", {})
    sentence = (f"The {plan['strategy']} search over the {plan['method']} fit, tolerance {plan['tolerance']:g} ({kind}): "
                f"a plan is acceptable when {metric['name']} on the {metric.get('split', 'search')} split, paired with "
                f"dense on the same examples, is at least {threshold:.4g} at {search.get('confidence', 0.5):.0%} "
                f"confidence (this plan's lower bound: {search.get('lower', metric['plan']):.4g}).")
    confirm = search.get("confirm")
    if confirm:
        held = "it held" if confirm["back_off"] == 0 else f"it held after backing off {confirm['back_off']:.0%} toward dense"
        sentence += (f" On the confirm part ({confirm['examples']} examples the search never saw) dense scored "
                     f"{confirm['dense']:.4g} and the plan {confirm['plan']:.4g}: {held}.")
    return sentence


def _stored_dense(applied: dict) -> str:
    product = applied.get("matrices", {}).get("product", 0)
    return f" ({product} matrices stored as a dense product, faster than factored)" if product else ""


def options_rows(manifests: dict[str, dict]) -> list[tuple]:
    rows = []
    for stage, manifest in manifests.items():
        options = (manifest.get("inputs") or {}).get("options")
        if options is None:
            options = {k: v for k, v in (manifest.get("inputs") or {}).items() if k != "upstream"}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in _flat(options))
        state = manifest.get("written", "")[:16].replace("T", " ") + ("" if manifest.get("complete") else " (unfinished)")
        rows.append((stage, state, shown))
    return rows


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    else:
        yield prefix.rstrip(".") or "value", obj


def _short(value, limit=80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_html(title: str, root: Path, sections: list[str]) -> str:
    return PAGE.format(title=html.escape(title), root=html.escape(str(root)), sections="\n".join(sections))
