"""push_to_hub offline: the model card records the weighting and links the plots, and the folder a push uploads
holds the card, the weights, the plots and the JSON records. The Hub API is replaced by a recorder (no network)."""

import json

import pytest
import transformers.trainer
from helpers import pad_collate, tiny_model, toy_dataset, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments
from hfweight.card import END, START, with_weighting_section


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

    # A second push refreshes the section instead of appending a copy.
    trainer.push_to_hub(commit_message="again")
    assert (tmp_path / "README.md").read_text().count(START) == 1


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
    summary = json.loads((tmp_path / "weighting_summary.json").read_text())
    for name, w in summary["final_reward_weights"].items():
        assert name in card and f"{w:.4f}" in card
    assert set(summary["final_multipliers"]) == {"short_reward", "low_reward"}
    assert set(summary["final_mixture"]) == {"a", "b", "c"}
    assert {"README.md", "weighting_summary.json", "mixture_weights.json", "weighting.png"} <= _uploaded_files(
        fake_hub.uploads[0]
    )
