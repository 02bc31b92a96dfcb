"""The README's "Use it" snippets run as written, so they cannot rot: each python block is executed unchanged, with the
names it leaves free (`model`, `tok`, `ds`, `prompts`, the reward functions) bound to the built-in tiny model and
data (hfweight.builtin), and its config class completed with a few tiny-run settings (2 steps, CPU, no saving). The
shell commands name scripts and recipes that exist, and every anchor of docs/methods.md the repository links to exists.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import hfweight
from hfweight.builtin import correctness_reward, format_reward, grpo_dataset, sft_dataset, tiny_setup

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

TINY_RUN = dict(max_steps=2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                bf16=False, seed=0)


def use_it_blocks(language: str) -> list[str]:
    """The ```language blocks of the README's "## Use it" section, in order."""
    section = README.split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def tiny_config(config_cls, output_dir: Path, **run):
    """A stand-in for ``config_cls`` that keeps every field the snippet sets and adds the tiny-run settings."""

    def make(**fields):
        fields.pop("output_dir", None)
        return config_cls(output_dir=str(output_dir), **fields, **TINY_RUN, **run)

    return make


def logged_steps(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def test_use_it_has_the_snippets_this_file_runs():
    python = use_it_blocks("python")
    assert len(python) == 2, "update tests/test_readme.py when the README's python snippets change"
    assert "WeightedSFTTrainer" in python[0] and "WeightedGRPOTrainer" in python[1]


def test_sft_snippet_runs_with_the_builtin_model_and_data(tmp_path, monkeypatch):
    """The SFT snippet: DFT token weights, Sow et al. sample weights and a static domain mixture by upweighting. Its
    domains (code, math, chat) are the built-in SFT domains under those names. Two steps train, every logged loss is
    finite, and the logged mixture is the snippet's static weights."""
    _, tok, model = tiny_setup()
    names = {"arithmetic": "math", "redundant": "chat", "code": "code"}
    ds = sft_dataset(n=24).map(lambda row: {"domain": names[row["domain"]]})
    monkeypatch.setattr(hfweight, "WeightedSFTConfig",
                        tiny_config(hfweight.WeightedSFTConfig, tmp_path, per_device_train_batch_size=4, max_length=64))
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "tok": tok, "ds": ds}
    exec(compile(use_it_blocks("python")[0], "README.md (SFT snippet)", "exec"), namespace)

    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    logs = logged_steps(trainer)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    for domain, weight in {"code": 0.5, "math": 0.3, "chat": 0.2}.items():
        assert logs[-1][f"mixture/{domain}"] == pytest.approx(weight)
    assert "weights/ess" in logs[-1]  # the loss-based sample weights are on


def accuracy(completions, answer, **kwargs):
    return correctness_reward(completions, answer, **kwargs)


def format(completions, **kwargs):  # noqa: A001 - the snippet's reward name
    return format_reward(completions, **kwargs)


def test_grpo_snippet_runs_with_the_builtin_model_and_prompts(tmp_path, monkeypatch):
    """The GRPO snippet: constrained reward weights (task `accuracy`, a threshold on `format`) and an ODM prompt-domain
    mixture. `model` is a saved built-in tiny model (the snippet passes no tokenizer, so TRL loads it from the model
    path). Two steps train; the weights are the Lagrangian ones (task n − λ, constraint λ) and the mixture covers the
    three prompt domains."""
    _, tok, model = tiny_setup()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(hfweight, "WeightedGRPOConfig", tiny_config(
        hfweight.WeightedGRPOConfig, tmp_path / "out", per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, beta=0.0))
    monkeypatch.chdir(tmp_path)
    namespace = {"model": str(tmp_path / "model"), "prompts": grpo_dataset(n=16), "accuracy": accuracy,
                 "format": format}
    exec(compile(use_it_blocks("python")[1], "README.md (GRPO snippet)", "exec"), namespace)
    trainer = namespace["trainer"]
    trainer.train()

    assert trainer.state.global_step == 2
    logs = logged_steps(trainer)
    # A batch is weighted with the multipliers from before its dual step (λ = sigmoid(0) = 0.5 at first); the step's
    # log shows those weights and the multiplier after the step.
    lam = [0.5] + [h["lagrange/format"] for h in logs]
    for step, h in enumerate(logs):
        assert h["reward_weight/format"] == pytest.approx(lam[step], rel=1e-6)
        assert h["reward_weight/accuracy"] == pytest.approx(1 - lam[step], rel=1e-6)
    assert lam[-1] != lam[0]
    assert sorted(k for k in logs[-1] if k.startswith("mixture/")) == ["mixture/add", "mixture/mul", "mixture/sub"]


def test_shell_commands_name_existing_scripts_and_recipes():
    commands = [line.strip() for block in use_it_blocks("bash") for line in block.splitlines() if line.strip()]
    assert commands
    for command in commands:
        for path in re.findall(r"(?:trainers|recipes|accelerate_configs)/[\w./-]+", command):
            assert (ROOT / path).exists(), f"README command names {path}, which does not exist: {command}"


def test_every_docs_methods_anchor_exists():
    """Docstrings, tests, benchmarks and the README link to anchors of docs/methods.md: each must exist."""
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', (ROOT / "docs" / "methods.md").read_text()))
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for folder in ("hfweight", "tests", "benchmarks", "trainers"):
        files += (ROOT / folder).rglob("*.py")
    cited = {}
    for path in files:
        for anchor in re.findall(r"methods\.md#([\w-]+)", path.read_text()) + (
            re.findall(r"\]\(#([\w-]+)\)", path.read_text()) if path.name == "methods.md" else []
        ):
            cited.setdefault(anchor, path.relative_to(ROOT))
    assert len(cited) > 10
    missing = {a: str(p) for a, p in cited.items() if a not in anchors}
    assert not missing, f"links to anchors that docs/methods.md does not define: {missing}"
