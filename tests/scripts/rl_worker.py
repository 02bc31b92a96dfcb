"""2-rank GRPO/RLOO run with dynamic reward weights and a prompt-domain mixture; each rank writes what it used.

Usage: torchrun --nproc_per_node 2 tests/scripts/rl_worker.py OUT_PREFIX ALGO [CONFIG ...]
Writes OUT_PREFIX.rank{R}.json: per configuration, the reward weights TRL applied to every generation batch, the
logged weights/probabilities, the prompt domains this rank received and the reward-gradient Gram.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import leave_process_group  # noqa: E402
from helpers_rl import make_trainer, recording  # noqa: E402

from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer, WeightedRLOOConfig, WeightedRLOOTrainer  # noqa: E402

CONFIGS = {
    "saw_odm": dict(reward_weighting="saw", mixture="odm", mixture_kwargs={"warmup_steps": 0}),
    "popart": dict(reward_weighting="popart"),
    "constrained": dict(reward_weighting="constrained", reward_weighting_kwargs={"thresholds": [0.9, 0.5]}),
    "gradient": dict(reward_weighting="gradient", reward_weighting_kwargs={"reg": 1e-3},
                     reward_gradient_parameters=r"^lm_head\."),
}


def main():
    prefix, algo = sys.argv[1], sys.argv[2]
    trainer_cls, config_cls = {
        "grpo": (WeightedGRPOTrainer, WeightedGRPOConfig),
        "rloo": (WeightedRLOOTrainer, WeightedRLOOConfig),
    }[algo]
    rank = int(os.environ.get("RANK", "0"))
    names = sys.argv[3:] or list(CONFIGS)
    results = {}
    for name, kwargs in ((n, CONFIGS[n]) for n in names):
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(recording(trainer_cls), config_cls, out, max_steps=3, **kwargs)
            trainer.train()
        logs = [{k: v for k, v in h.items() if k.split("/")[0] in ("reward_weight", "mixture", "lagrange")}
                for h in trainer.state.log_history if "loss" in h]
        results[name] = {
            "weights": [w.tolist() for w in trainer.recorded["weights"]],
            "rewards": [r.tolist() for r in trainer.recorded["rewards"]],
            "logs": logs,
            "domains": trainer.recorded["domains"],
            "state": json.loads(json.dumps(trainer.reward_weighting.state_dict(), default=str)),
        }
        if name == "gradient":
            results[name]["gram"] = trainer._last_reward_gram.tolist()
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
    leave_process_group()
