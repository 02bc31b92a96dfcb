"""Tiny GRPO/RLOO fixtures: prompts over the test vocabulary and three cheap, deterministic reward functions.

Kept independent of the built-in corpus so GRPO/RLOO tests (and their 2-rank worker scripts) start in seconds.
"""

from __future__ import annotations

import datasets
import torch
from helpers import WORDS, cpu_run_args, tiny_model, tiny_tokenizer


def prompt_rows(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(2, 5, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
        rows.append({"prompt": " ".join(words), "target": words[0], "domain": ["a", "b", "c"][i % 3]})
    return rows


def prompt_dataset(n: int = 16, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list(prompt_rows(n, seed))


def _words(completion) -> list[str]:
    return completion.split() if isinstance(completion, str) else []


def hit_reward(completions, target, **kwargs):
    """1 when the completion contains the prompt's first word (a 0/1 'correctness')."""
    return [float(t in _words(c)) for c, t in zip(completions, target)]


def short_reward(completions, **kwargs):
    """Brevity: 1 − words/8, clipped at 0."""
    return [max(0.0, 1.0 - len(_words(c)) / 8) for c in completions]


def low_reward(completions, **kwargs):
    """Fraction of words from the first half of the vocabulary; None (unscorable) for an empty completion."""
    out = []
    for c in completions:
        words = _words(c)
        out.append(None if not words else sum(int(w[1:]) < len(WORDS) // 2 for w in words) / len(words))
    return out


REWARDS = [hit_reward, short_reward, low_reward]


def rl_args(output_dir: str, **overrides) -> dict:
    """:func:`helpers.cpu_run_args` for GRPO/RLOO: 3 steps at learning rate 1e-2, 4 completions of at most 6 tokens per
    prompt, fp32, no KL term."""
    args = cpu_run_args(
        output_dir, num_generations=4, max_completion_length=6, max_steps=3, learning_rate=1e-2, bf16=False, beta=0.0
    )
    args.update(overrides)
    return args


def make_trainer(trainer_cls, config_cls, output_dir, *, train=None, eval_dataset=None, rewards=None, model_seed=0, callbacks=None, **overrides):
    """Build a GRPO/RLOO trainer (parent or Weighted*) on the tiny model and prompts."""
    return trainer_cls(
        model=tiny_model(model_seed),
        reward_funcs=list(rewards or REWARDS),
        args=config_cls(**rl_args(str(output_dir), **overrides)),
        train_dataset=train if train is not None else prompt_dataset(),
        eval_dataset=eval_dataset,
        processing_class=tiny_tokenizer(),
        callbacks=callbacks,
    )


def gappy(reward):
    """``reward`` with every completion of an odd number of words unscorable (None): with every reward function
    wrapped, those rows are all-NaN, as when every verifier fails on a completion."""

    def wrapped(completions, **kwargs):
        values = reward(completions, **kwargs)
        return [None if len(_words(c)) % 2 else v for c, v in zip(completions, values)]

    wrapped.__name__ = reward.__name__
    return wrapped


def constant_reward(completions, **kwargs):
    return [1.0 for _ in completions]


class Recorder:
    """Mix in before a GRPO/RLOO trainer to record, per training generation batch, the gathered rewards, the weights
    TRL applied, the advantages TRL formed and the prompts' domains."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training and getattr(self, "_capture_validation", None) is None:
            self.recorded.setdefault("rewards", []).append(rewards.detach().clone())
            self.recorded.setdefault("weights", []).append(self.reward_weights.clone())
            self.recorded.setdefault("domains", []).append([row.get("domain") for row in inputs])
        elif getattr(self, "_capture_validation", None) is not None:
            self.recorded.setdefault("validation_rewards", []).append(rewards.detach().clone())
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training and getattr(self, "_capture_validation", None) is None:
            self.recorded.setdefault("advantages", []).append(output["advantages"].detach().clone())
        return output


def recording(trainer_cls):
    cls = type(f"Recording{trainer_cls.__name__}", (Recorder, trainer_cls), {})
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        self.recorded = {}
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
