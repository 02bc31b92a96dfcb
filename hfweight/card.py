"""The model card's weighting section: what a reader of a pushed model needs to know about how it was weighted.

``transformers.Trainer.push_to_hub`` (and TRL's trainers) write ``README.md`` through ``create_model_card`` and then
upload the output directory. :class:`~hfweight.glue.core.WeightingCore` overrides ``create_model_card`` to append the
section rendered here: the weighting configuration, the final domain mixture and reward weights, and the plots
(written next to the card, so the relative image links resolve on the Hub and locally).

The section sits between two HTML comments so that writing the card again (a second push, a push per checkpoint)
replaces it instead of appending a copy.
"""

from __future__ import annotations

import json
import os

START = "<!-- hfweight:weighting:start -->"
END = "<!-- hfweight:weighting:end -->"

# Summary keys rendered as a two-column table of named weights, with their headings.
_WEIGHT_TABLES = {
    "final_mixture": ("Final domain mixture", "domain", "probability"),
    "final_reward_weights": ("Final reward weights", "reward", "weight"),
    "final_multipliers": ("Final Lagrange multipliers", "reward", "multiplier"),
}


def _cell(value) -> str:
    """A table cell: strings as code, everything else as compact JSON; pipes escaped so the table holds."""
    text = f"`{value}`" if isinstance(value, str) else json.dumps(value, sort_keys=True, default=repr)
    return text.replace("|", "\\|")


def _weights_table(title: str, key_name: str, value_name: str, weights: dict) -> list[str]:
    lines = [f"### {title}", "", f"| {key_name} | {value_name} |", "|---|---|"]
    lines += [f"| {_cell(name)} | {value:.4f} |" for name, value in weights.items()]
    return lines + [""]


def weighting_card_section(summary: dict, plots: list[str]) -> str:
    """Markdown for the card: ``summary`` is what ``weighting_summary.json`` holds (``config``, ``domains``, and
    optionally ``final_mixture`` / ``final_reward_weights`` / ``final_multipliers`` as name → value); ``plots`` are
    image file names relative to the card."""
    lines = [START, "## Loss weighting (hfweight)", ""]
    lines += [
        "This model was trained with [hfweight](https://github.com/hfweight/hfweight) loss weighting. "
        "The full record is in `weighting_summary.json`; the final mixture, where there is one, in "
        "`mixture_weights.json` (loadable by `mixture=\"static\"`).",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    config = summary.get("config", {})
    lines += [f"| `{name}` | {_cell(value)} |" for name, value in config.items()]
    if summary.get("domains"):
        lines.append(f"| domains | {_cell(summary['domains'])} |")
    lines.append("")
    for key, (title, key_name, value_name) in _WEIGHT_TABLES.items():
        if summary.get(key):
            lines += _weights_table(title, key_name, value_name, summary[key])
    for plot in plots:
        lines += [f"![{os.path.splitext(plot)[0]}]({plot})", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def with_weighting_section(card: str, section: str) -> str:
    """``card`` with its weighting section replaced by ``section`` (appended if it has none)."""
    if START in card and END in card:
        before, rest = card.split(START, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        return before + section + after
    return card.rstrip("\n") + "\n\n" + section


def write_weighting_section(output_dir: str, summary: dict, plots: list[str]) -> str:
    """Add (or refresh) the weighting section of ``output_dir/README.md``; create the card if there is none."""
    path = os.path.join(output_dir, "README.md")
    card = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            card = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(with_weighting_section(card, weighting_card_section(summary, plots)))
    return path
