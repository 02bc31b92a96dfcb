"""push_to_hub offline: the model card records the weighting and links the plots, and the folder a push uploads
holds the card, the weights, the plots and the JSON records. The Hub API is replaced by a recorder (no network)."""

import json

import pytest
import transformers.trainer
from helpers import pad_collate, tiny_model, toy_dataset, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.card import END, METHODS, START, with_weighting_section


def card_metadata(path) -> tuple[list[str], str]:
    """The tags and the text of the card at ``path`` as the Hub reads it (``huggingface_hub.ModelCard``)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    return card.data.tags, card.text


def assert_no_dead_links(text: str) -> None:
    """The card links nothing that does not exist: no made-up project repository; the weighting section links nothing
    but its own plots and the URL the installed package declares, if any (today none)."""
    from hfweight.card import project_url

    section = text.split(START, 1)[1].split(END, 1)[0]
    if project_url():
        section = section.replace(f"]({project_url()})", "")
    assert "github.com/hfweight" not in text and "](http" not in section


class FakeHubApi:
    """Records ``upload_folder`` calls instead of uploading."""

    def __init__(self):
        self.uploads = []
        self.repos = []

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)
        return "https://huggingface.co/fake/commit"


def _uploaded_files(upload: dict) -> set[str]:
    """The files ``upload_folder`` would send: everything in the folder minus its ignore patterns."""
    import fnmatch
    import os

    root = upload["folder_path"]
    files = set()
    for directory, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), root)
            if not any(fnmatch.fnmatch(part, pattern) for pattern in upload.get("ignore_patterns") or [] for part in rel.split(os.sep)):
                files.add(rel)
    return files


@pytest.fixture
def fake_hub(monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda *a, **k: api)
    return api


def test_push_to_hub_card_records_weighting(tmp_path, fake_hub):
    weights = {"code": 2.0, "prose": 1.0, "math": 1.0}
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), max_steps=2, hub_model_id="someone/tiny-weighted"),
        token_weighting="static",
        sample_weighting="static",
        mixture="static",
        mixture_mode="upweight",
        mixture_kwargs={"weights": weights},
    )
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(8), data_collator=pad_collate)
    trainer.train()
    trainer.push_to_hub(commit_message="test")

    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "someone/tiny-weighted"
    files = _uploaded_files(upload)
    assert {"README.md", "weighting_summary.json", "mixture_weights.json", "weighting.png", "config.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)

    card = (tmp_path / "README.md").read_text()
    assert card.count(START) == 1 and card.count(END) == 1
    assert "| `token_weighting` | `static` |" in card and "| `mixture_mode` | `upweight` |" in card
    # The final mixture is α normalized: 0.5 / 0.25 / 0.25, as recorded in mixture_weights.json.
    recorded = json.loads((tmp_path / "mixture_weights.json").read_text())["weights"]
    assert recorded == pytest.approx({"code": 0.5, "prose": 0.25, "math": 0.25})
    for domain, p in recorded.items():
        assert f"| `{domain}` | {p:.4f} |" in card
    assert "![weighting](weighting.png)" in card

    tags, text = card_metadata(tmp_path / "README.md")
    assert set(tags) == {"generated_from_trainer", "hfweight", "token-weighting", "sample-weighting", "data-mixture"}
    assert_no_dead_links(text)

    # A second push refreshes the section instead of appending a copy, and keeps the tags once each.
    trainer.push_to_hub(commit_message="again")
    assert (tmp_path / "README.md").read_text().count(START) == 1
    tags, _ = card_metadata(tmp_path / "README.md")
    assert sorted(tags) == sorted(set(tags)) and "hfweight" in tags


def test_card_tags_and_methods_for_odm_with_loss_reweighting(tmp_path):
    """The issue's case: mixture='odm', sample_weighting='loss' through Trainer.create_model_card (no push)."""
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), max_steps=2, learning_rate=1e-3),
        sample_weighting="loss", mixture="odm", mixture_kwargs={"warmup_steps": 0},
    )
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(16), data_collator=pad_collate)
    trainer.train()
    trainer.create_model_card(tags=["my-tag"])
    tags, text = card_metadata(tmp_path / "README.md")
    assert tags == ["my-tag", "hfweight", "loss-reweighting", "odm", "generated_from_trainer"]
    assert "- `sample_weighting='loss'`: dynamic loss-based reweighting (Sow et al. 2025) (tag `loss-reweighting`)" in text
    assert "- `mixture='odm'`: Online Data Mixing (Albalak et al. 2023) (tag `odm`)" in text
    assert "| `loss_normalization` | `token` |" in text  # a supervised run states its normalization
    summary = json.loads((tmp_path / "weighting_summary.json").read_text())
    assert "### Final domain mixture" in text and set(summary["final_mixture"]) == {"code", "prose", "math"}
    for domain, p in summary["final_mixture"].items():
        assert f"| `{domain}` | {p:.4f} |" in text
    assert_no_dead_links(text)


def test_card_links_the_project_url_from_package_metadata(monkeypatch):
    """With a Project-URL in the installed package's metadata the card links it; without one it links nothing."""
    import email.message

    from hfweight import card

    meta = email.message.Message()
    monkeypatch.setattr(card.metadata, "metadata", lambda name: meta)
    section = card.weighting_card_section({"config": {"mixture": "odm"}}, [])
    assert "trained with hfweight loss weighting" in section and "](" not in section
    meta["Project-URL"] = "Homepage, https://example.org/hfweight"
    section = card.weighting_card_section({"config": {"mixture": "odm"}}, [])
    assert "trained with [hfweight](https://example.org/hfweight) loss weighting" in section


def test_every_built_in_method_has_a_tag_documented_in_methods_md():
    """One tag per built-in method of every registry, each listed in docs/methods.md's tag table."""
    import os

    from hfweight.config import STRATEGY_REGISTRIES

    built_in = {
        (field, name) for field, registry in STRATEGY_REGISTRIES.items()
        for name, factory in registry._factories.items() if factory.__module__.startswith("hfweight.")
    }
    assert built_in == set(METHODS)
    tags = [tag for tag, _ in METHODS.values()]
    assert len(set(tags)) == len(tags)
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "methods.md"), encoding="utf-8").read()
    for (field, name), (tag, _) in METHODS.items():
        assert f"| `{field}` | `{name}` | `{tag}` |" in docs


def test_card_section_replaced_in_place():
    card = "# Model\n\nintro\n"
    once = with_weighting_section(card, f"{START}\nA\n{END}\n")
    twice = with_weighting_section(once + "\n## Citation\n", f"{START}\nB\n{END}\n")
    assert twice.startswith("# Model\n\nintro\n") and "\nB\n" in twice and "\nA\n" not in twice
    assert twice.rstrip().endswith("## Citation")


def test_card_unchanged_when_weighting_off(tmp_path, fake_hub):
    args = WeightedTrainingArguments(**training_args(str(tmp_path), max_steps=1, hub_model_id="someone/plain"))
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(4), data_collator=pad_collate)
    trainer.train()
    trainer.push_to_hub()
    assert START not in (tmp_path / "README.md").read_text()


def test_sft_push_to_hub_card(tmp_path, fake_hub):
    """TRL writes its own card (``create_model_card`` of its trainers); the weighting section is added to it."""
    import datasets
    from helpers import sft_rows, tiny_tokenizer

    from hfweight import WeightedSFTConfig, WeightedSFTTrainer

    args = WeightedSFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        max_length=24,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        hub_model_id="someone/tiny-sft",
        token_weighting="dft",
    )
    trainer = WeightedSFTTrainer(
        model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(sft_rows(8)), processing_class=tiny_tokenizer()
    )
    trainer.train()
    trainer.push_to_hub()
    card = (tmp_path / "README.md").read_text()
    assert "TRL" in card  # TRL's own card is kept
    tags, text = card_metadata(tmp_path / "README.md")
    assert set(tags) == {"generated_from_trainer", "trl", "sft", "hfweight", "dft"}
    assert_no_dead_links(text)
    assert "| `token_weighting` | `dft` |" in card and "![weighting](weighting.png)" in card
    assert {"README.md", "weighting_summary.json", "weighting.png"} <= _uploaded_files(fake_hub.uploads[0])


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rl_push_to_hub_card_has_final_reward_weights_and_multipliers(algo, tmp_path, fake_hub):
    from helpers_rl import make_trainer

    from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer, WeightedRLOOConfig, WeightedRLOOTrainer

    trainer_cls, config_cls = {"grpo": (WeightedGRPOTrainer, WeightedGRPOConfig),
                               "rloo": (WeightedRLOOTrainer, WeightedRLOOConfig)}[algo]
    trainer = make_trainer(
        trainer_cls, config_cls, tmp_path, max_steps=2, hub_model_id=f"someone/tiny-{algo}",
        reward_weighting="constrained", reward_weighting_kwargs={"thresholds": [0.9, 0.5]},
        mixture="odm", mixture_kwargs={"warmup_steps": 0},
    )
    trainer.train()
    trainer.push_to_hub()
    card = (tmp_path / "README.md").read_text()
    assert "| `reward_weighting` | `constrained` |" in card and "![weighting](weighting.png)" in card
    tags, text = card_metadata(tmp_path / "README.md")
    assert set(tags) == {"generated_from_trainer", "trl", algo, "hfweight", "odm", "constrained-rlhf"}
    assert "loss_normalization" not in text  # the RL configs reject the field: the card does not state it
    assert_no_dead_links(text)
    summary = json.loads((tmp_path / "weighting_summary.json").read_text())
    for name, w in summary["final_reward_weights"].items():
        assert name in card and f"{w:.4f}" in card
    assert set(summary["final_multipliers"]) == {"short_reward", "low_reward"}
    assert set(summary["final_mixture"]) == {"a", "b", "c"}
    assert {"README.md", "weighting_summary.json", "mixture_weights.json", "weighting.png"} <= _uploaded_files(
        fake_hub.uploads[0]
    )
