"""The model card's weighting section: what a reader of a pushed model needs to know about how it was weighted.

``transformers.Trainer.push_to_hub`` (and TRL's trainers) write ``README.md`` through ``create_model_card`` and then
upload the output directory. :class:`~hfweight.glue.core.WeightingCore` overrides ``create_model_card`` to append the
section rendered here: the weighting configuration, the final domain mixture and reward weights, and the plots
(written next to the card, so the relative image links resolve on the Hub and locally).

The section sits between two HTML comments so that writing the card again (a second push, a push per checkpoint)
replaces it instead of appending a copy.

The card's metadata tags (what the Hub searches by) are the parent's — ``generated_from_trainer``, and TRL's
``_tag_names`` such as ``trl``/``sft`` — plus ``hfweight`` and one tag per method used, from :data:`METHODS`
(the list is documented in ``docs/methods.md#model-card-tags``).
"""

from __future__ import annotations

import json
import os
from importlib import metadata

LIBRARY_TAG = "hfweight"

# Every built-in method: (config field, registered name) -> (its Hub tag, what the card calls it). The one place tags
# are defined; docs/methods.md#model-card-tags lists the same table (a test keeps the two and the registries in step).
METHODS = {
    ("token_weighting", "static"): ("token-weighting", "per-token weights from the `token_weights` column"),
    ("token_weighting", "dft"): ("dft", "Dynamic Fine-Tuning (Wu et al. 2025)"),
    ("token_weighting", "asft"): ("asft", "Anchored SFT (Zhu et al. 2025)"),
    ("token_weighting", "focal"): ("focal-loss", "focal loss (Lin et al. 2017)"),
    ("token_weighting", "rho1"): ("rho-1", "Rho-1 selective language modeling (Lin et al. 2024)"),
    ("token_weighting", "prior"): ("prior-token-weighting", "reference-probability token weights (PRIOR, 2025)"),
    ("sample_weighting", "static"): ("sample-weighting", "per-sample weights from the `sample_weight` column"),
    ("sample_weighting", "loss"): ("loss-reweighting", "dynamic loss-based reweighting (Sow et al. 2025)"),
    ("sample_weighting", "truncation"): ("loss-truncation", "loss truncation (Kang & Hashimoto 2020)"),
    ("sample_weighting", "storm"): ("storm", "STORM meta loss rescaling (after Heck et al. 2025)"),
    ("mixture", "static"): ("data-mixture", "a fixed domain mixture"),
    ("mixture", "temperature"): ("temperature-sampling", "temperature sampling over domain sizes"),
    ("mixture", "schedule"): ("mixture-schedule", "a scheduled domain mixture"),
    ("mixture", "doremi"): ("doremi", "DoReMi (Xie et al. 2023)"),
    ("mixture", "odm"): ("odm", "Online Data Mixing (Albalak et al. 2023)"),
    ("mixture", "aioli"): ("aioli", "Aioli (Chen et al. 2024)"),
    ("mixture", "skillit"): ("skill-it", "Skill-It (Chen et al. 2023)"),
    ("mixture", "dga"): ("dga", "Dynamic Gradient Alignment (Fan et al. 2024)"),
    ("mixture", "learning_progress"): ("learning-progress", "learning-progress domain sampling"),
    ("mixture", "policy"): ("mixture-policy", "a user mixture policy"),
    ("reward_weighting", "static"): ("reward-weighting", "fixed reward weights"),
    ("reward_weighting", "popart"): ("popart", "PopArt running reward normalization"),
    ("reward_weighting", "saw"): ("saw", "variance/saturation-aware reward weights"),
    ("reward_weighting", "hypervolume"): ("hypervolume-reward-weighting", "hypervolume-guided weights (Lu et al. 2025)"),
    ("reward_weighting", "gradient"): ("gradient-reward-weighting", "gradient-based weights (Lu et al. 2025)"),
    ("reward_weighting", "constrained"): ("constrained-rlhf", "constrained RLHF (Moskovitz et al. 2024)"),
}
# A user-registered name or a strategy object gets its field's generic tag (the tag of the field's `static` method).
FIELD_TAGS = {field: tag for (field, name), (tag, _) in METHODS.items() if name == "static"}


def method_tag(field: str, name: str) -> str:
    """The Hub tag of method ``name`` of config field ``field`` (its field's generic tag when not built in)."""
    return METHODS.get((field, name), (FIELD_TAGS[field], None))[0]


def card_tags(config: dict) -> list[str]:
    """``hfweight`` and one tag per method in ``config`` (a ``weighting_summary()``: field -> name), in field order."""
    tags = [LIBRARY_TAG]
    for field in FIELD_TAGS:
        if config.get(field) is not None and method_tag(field, config[field]) not in tags:
            tags.append(method_tag(field, config[field]))
    return tags


def project_url() -> str | None:
    """The project's home page from the installed package's metadata (``Project-URL`` ``Homepage``/``Repository``/
    ``Source``, else ``Home-page``); None when it declares none (the card then links nowhere rather than guessing)."""
    try:
        meta = metadata.metadata(LIBRARY_TAG)
    except metadata.PackageNotFoundError:
        return None
    urls = dict(entry.split(",", 1) for entry in meta.get_all("Project-URL") or [] if "," in entry)
    urls = {label.strip().lower(): url.strip() for label, url in urls.items()}
    for label in ("homepage", "home", "repository", "source"):
        if urls.get(label):
            return urls[label]
    return meta.get("Home-page") or None


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
    url = project_url()
    library = f"[hfweight]({url})" if url else "hfweight"
    config = summary.get("config", {})
    lines = [START, "## Loss weighting (hfweight)", ""]
    lines += [
        f"This model was trained with {library} loss weighting. The full record is in `weighting_summary.json`; the "
        "final mixture, where there is one, in `mixture_weights.json` (loadable by `mixture=\"static\"`).",
        "",
        "### Methods",
        "",
    ]
    for field in FIELD_TAGS:
        if config.get(field) is not None:
            name = config[field]
            what = METHODS.get((field, name), (None, "a user-defined strategy"))[1]
            lines.append(f"- `{field}={name!r}`: {what} (tag `{method_tag(field, name)}`)")
    lines += ["", "### Settings", "", "| setting | value |", "|---|---|"]
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
