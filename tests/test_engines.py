"""The engine helper (tests/engines.py) and, launched on 2 gloo CPU ranks, training under DDP, DeepSpeed ZeRO-2/3 and
FSDP2 (issue 12)."""

from __future__ import annotations

import sys

import engines
import pytest

DDP_FACTS = {
    "distributed_type": "DistributedType.MULTI_CPU",
    "world_size": 2,
    "wrapper": "torch.nn.parallel.distributed.DistributedDataParallel",
    "zero_stage": None,
    "dtensor_params": 0,
    "params": 21,
    "local_numel": 22688,
    "full_numel": 22688,
}


def test_check_engine_catches_a_silent_ddp_fallback():
    assert engines.check_engine(DDP_FACTS, "ddp") == []
    for engine in ("zero2", "zero3", "fsdp2"):
        assert engines.check_engine(DDP_FACTS, engine), f"a DDP run passed as {engine}"
    zero2 = {**DDP_FACTS, "distributed_type": "DistributedType.DEEPSPEED", "zero_stage": 2,
             "wrapper": "deepspeed.runtime.engine.DeepSpeedEngine"}
    assert engines.check_engine(zero2, "zero2") == []
    assert engines.check_engine(zero2, "zero3"), "ZeRO-2 passed as ZeRO-3"
    unsharded_zero3 = {**zero2, "zero_stage": 3}  # stage 3 with every parameter below the persistence threshold
    assert any("not sharded" in p for p in engines.check_engine(unsharded_zero3, "zero3"))
    assert engines.check_engine({**unsharded_zero3, "local_numel": 11344}, "zero3") == []
    fsdp = {**DDP_FACTS, "distributed_type": "DistributedType.FSDP", "dtensor_params": 21, "local_numel": 11360,
            "wrapper": "transformers.models.llama.modeling_llama.FSDPLlamaForCausalLM"}
    assert engines.check_engine(fsdp, "fsdp2") == []
    assert engines.check_engine({**fsdp, "dtensor_params": 20}, "fsdp2")
    assert engines.check_engine({**fsdp, "world_size": 1}, "fsdp2")


def test_training_overrides_and_flags(tmp_path):
    assert engines.training_overrides("ddp") == {}
    zero3 = engines.training_overrides("zero3")["deepspeed"]["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_param_persistence_threshold"] == 0
    assert engines.training_overrides("fsdp2")["fsdp_config"]["version"] == 2
    flags = engines.cli_flags("fsdp2", str(tmp_path))
    assert flags[:2] == ["--fsdp", "full_shard"] and flags[2] == "--fsdp_config" and flags[3].endswith(".json")
    with pytest.raises(ValueError, match="unknown engine"):
        engines.training_overrides("zero1")


def test_shm_patch_lands_on_deepspeeds_module_not_on_torch():
    pytest.importorskip("deepspeed")
    import torch

    engines.activate("zero2")
    assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None
    assert not hasattr(torch, "build_shm_op")


# ---- engine × trainer, 2 ranks (one launch per engine; tests/engine_cases.py) ---------------------------------------

REL = 1e-5  # fp32; the sharded engines reduce in a different order than DDP


def _tree_close(got, want, path: str, rel: float = REL) -> list[str]:
    """Differences between two records (dicts/lists of tensors and numbers) beyond ``rel``, as readable strings."""
    import torch

    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: keys {sorted(got)} != {sorted(want)}"]
        return [m for k in want for m in _tree_close(got[k], want[k], f"{path}.{k}", rel)]
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [m for i, (g, w) in enumerate(zip(got, want)) for m in _tree_close(g, w, f"{path}[{i}]", rel)]
    if isinstance(want, torch.Tensor):
        if got.shape != want.shape:
            return [f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"]
        if not want.is_floating_point():
            return [] if torch.equal(got, want) else [f"{path}: {got} != {want}"]
        finite = torch.isfinite(want)
        if not torch.equal(finite, torch.isfinite(got)):
            return [f"{path}: non-finite entries differ"]
        diff = (got[finite] - want[finite]).norm().item()
        scale = want[finite].norm().item()
        return [] if diff <= rel * max(scale, 1e-12) else [f"{path}: relative difference {diff / scale:.2e}"]
    if isinstance(want, float):
        ok = got == want or abs(got - want) <= rel * max(abs(want), 1e-12)
        return [] if ok else [f"{path}: {got} != {want}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def _step_delta(run: dict) -> dict:
    return {k: run["params"][k] - run["initial"][k] for k in run["initial"]}


_LAUNCHES: dict[str, list] = {}


def _launch(engine: str, tmp_path_factory) -> list:
    """All of tests/engine_cases.py under ``engine``: one 2-rank launch per engine and test session."""
    if engine not in _LAUNCHES:
        workdir = str(tmp_path_factory.mktemp(f"engine_{engine}"))
        ranks = engines.run_engine(engine, "engine_cases:all_cases", workdir)
        _LAUNCHES[engine] = ranks
    return _LAUNCHES[engine]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return [rank["cases"] for rank in _launch("ddp", tmp_path_factory)]


def _check_against_ddp(engine: str, runs: list, ddp: list) -> list[str]:
    """Every case of ``runs`` (both ranks) against DDP's: the refusals, the engine, the parameter change, every
    dynamic weight and probability (and that both ranks used the same global ones), the logged metrics."""
    from engine_cases import CASES, REFUSED, SEPARATE_REFERENCE

    problems = []
    for name in CASES:
        for rank in range(2):
            got, want = runs[rank][name], ddp[rank][name]
            where = f"{engine}/{name}/rank{rank}"
            assert "refused" not in want, f"ddp/{name} refused: {want['refused']}"
            if (engine, name) in REFUSED:
                assert REFUSED[engine, name] in got.get("refused", ""), f"{where}: expected a refusal, got {got.keys()}"
                continue
            assert "refused" not in got, f"{where} refused: {got['refused']}"
            problems += [f"{where}: {p}" for p in engines.check_engine(got["facts"], engine)]
            problems += _tree_close(_step_delta(got), _step_delta(want), f"{where} parameter change")
            problems += _tree_close(got["dynamic"], want["dynamic"], f"{where} dynamic")
            problems += _tree_close(got["logs"], want["logs"], f"{where} logs")
            reference = got["reference"]
            if name in SEPARATE_REFERENCE:
                sharded = reference["local_numel"] < reference["full_numel"]
                if sharded != (engine in engines.SHARDED) or reference["requires_grad"]:
                    problems.append(f"{where}: reference {reference}")
        # The mixture, the loss strategy's state and DGA's alignment are global: identical on both ranks, bit for bit.
        if (engine, name) not in REFUSED:
            for step, (r0, r1) in enumerate(zip(runs[0][name]["dynamic"], runs[1][name]["dynamic"])):
                shared = {k: v for k, v in r0.items() if k != "sample_weights"}
                problems += _tree_close({k: r1[k] for k in shared}, shared, f"{engine}/{name} step {step} ranks", 0.0)
    return problems


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_cases_agree_across_ranks(ddp_runs):
    assert _check_against_ddp("ddp", ddp_runs, ddp_runs) == []


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_engine_takes_the_ddp_steps(engine, ddp_runs, tmp_path_factory):
    """Every WeightedTrainer / WeightedSFTTrainer case takes DDP's two optimizer steps under the engine."""
    runs = [rank["cases"] for rank in _launch(engine, tmp_path_factory)]
    problems = _check_against_ddp(engine, runs, ddp_runs)
    assert problems == [], "\n".join(problems[:40])


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_engine_resume_equals_straight_run(engine, tmp_path_factory):
    """Loss-based sample weights + an ODM mixture: N steps, a checkpoint, a new trainer resumed to 2N ends exactly
    where 2N straight steps end (parameters, optimizer-driven updates, mixture and strategy state, logs)."""
    from engine_cases import RESUME_STEPS

    for rank, run in enumerate(_launch(engine, tmp_path_factory)):
        resumed, straight = run["resume"]["resumed"], run["resume"]["straight"]
        assert engines.check_engine(resumed["facts"], engine) == []
        assert len(resumed["dynamic"]) == RESUME_STEPS  # only the steps after the checkpoint ran
        where = f"{engine}/rank{rank}"
        problems = _tree_close(resumed["params"], straight["params"], f"{where} params", 0.0)
        problems += _tree_close(resumed["dynamic"], straight["dynamic"][RESUME_STEPS:], f"{where} dynamic", 0.0)
        problems += _tree_close(resumed["logs"], straight["logs"], f"{where} logs", 0.0)
        assert problems == [], "\n".join(problems[:40])
        # the engine's own sharded checkpoint, plus hfweight's state of each rank
        files = resumed["checkpoint_files"]
        assert "hfweight_state.pt" in files and "hfweight_state_rank1.pt" in files, files
        assert ("global_step2" in files) if engine.startswith("zero") else ("pytorch_model_fsdp_0" in files), files


@pytest.mark.multiprocess
@pytest.mark.slow
def test_entry_script_runs_under_fsdp2(tmp_path):
    """An entry script runs unchanged under an engine (tests/scripts/engine_entry.py appends `--fsdp full_shard
    --fsdp_config <json>`) and every rank reports FSDP2 at work after training."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = engines.run_entry(
        "fsdp2", str(root / "trainers" / "pretrain.py"), "--config", str(root / "recipes/tiny/pretrain_domain_weights.yaml"),
        "--max_steps", "2", "--save_strategy", "no", "--per_device_train_batch_size", "4", "--max_length", "64",
        "--logging_steps", "1", "--output_dir", str(tmp_path / "run"),
    )
    facts = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("ENGINE_FACTS ")]
    assert len(facts) == 2 and all(engines.check_engine(f, "fsdp2") == [] for f in facts), proc.stdout[-3000:]
