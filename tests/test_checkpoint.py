"""config.CHECKPOINT.KEEP_LAST: the checkpoint manager keeps the last k iteration checkpoints, every epoch
checkpoint VISSL's CHECKPOINT_FREQUENCY rule keeps, the final one and the one 'latest' points at; files and
directories (FSDP / DeepSpeed) alike, with DeepSpeed's consolidated export; the pointer first."""
import json
import os

import pytest
import torch

from scaleclr.checkpoint import CheckpointManager


def _write(tmp_path, name, directory=False):
    p = tmp_path / name
    if directory:
        p.mkdir()
        (p / "shard.distcp").write_bytes(b"x")
        (tmp_path / f"{name}_consolidated_fp32.torch").write_bytes(b"x")
        return str(p)
    torch.save({"w": torch.ones(1)}, p)
    return str(p)


def _names(tmp_path):
    return sorted(n for n in os.listdir(tmp_path) if n.startswith("model_"))


def test_keep_last_two_with_epoch_frequency_two(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=2, epoch_frequency=2)
    (tmp_path / "model_iteration99.torch").write_bytes(b"never recorded: not ours to delete")
    seq = [("model_iteration1.torch", 0, 1, False, False), ("model_iteration2", 0, 2, False, True),
           ("model_phase0.torch", 1, 4, False, False), ("model_iteration5.torch", 1, 5, False, False),
           ("model_phase1.torch", 2, 8, False, False),  # E=1: not kept by the rule (a stop at an epoch end)
           ("model_iteration9.torch", 2, 9, False, False), ("model_final_checkpoint_phase2.torch", 3, 12, True, False)]
    left = []
    for name, done, step, final, directory in seq:
        m.record(_write(tmp_path, name, directory), "ddp", done, step, final)
        left.append(_names(tmp_path))
    assert left[2] == ["model_iteration1.torch", "model_iteration2", "model_iteration2_consolidated_fp32.torch",
                       "model_iteration99.torch", "model_phase0.torch"]
    assert left[3] == ["model_iteration2", "model_iteration2_consolidated_fp32.torch", "model_iteration5.torch",
                       "model_iteration99.torch", "model_phase0.torch"]
    assert left[4] == ["model_iteration5.torch", "model_iteration99.torch", "model_phase0.torch",
                       "model_phase1.torch"]
    assert left[6] == ["model_final_checkpoint_phase2.torch", "model_iteration9.torch", "model_iteration99.torch",
                       "model_phase0.torch", "model_phase1.torch"]
    pointer = json.loads((tmp_path / "checkpoint.json").read_text())
    assert [h["path"] for h in pointer["history"]] == ["model_phase0.torch", "model_phase1.torch",
                                                       "model_iteration9.torch", "model_final_checkpoint_phase2.torch"]
    assert m.latest()["path"] == "model_final_checkpoint_phase2.torch"
    assert m.latest(2)["path"] == "model_iteration9.torch"


def test_keep_last_zero_keeps_only_what_latest_points_at(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=0)
    for step in (1, 2, 3):
        m.record(_write(tmp_path, f"model_iteration{step}.torch"), "ddp", 0, step, False)
        assert _names(tmp_path) == [f"model_iteration{step}.torch"]
    assert m.latest()["path"] == "model_iteration3.torch"


def test_keep_all_by_default(tmp_path):
    m = CheckpointManager(str(tmp_path))
    for step in (1, 2, 3):
        m.record(_write(tmp_path, f"model_iteration{step}.torch"), "ddp", 0, step, False)
    assert len(_names(tmp_path)) == 3


def test_keep_last_is_validated():
    from scaleclr.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"config\.CHECKPOINT\.KEEP_LAST: = -2; allowed: -1"):
        load_config(["config=test/integration_test/quick_simclr_synthetic", "config.CHECKPOINT.KEEP_LAST=-2"])


def test_older_checkpoint_layouts_migrate_in_one_place():
    """migrate_checkpoint / migrate_record: every older layout rule (renamed train-state fields, iters_per_epoch, no
    sampler state, rank 0's CPU generator only, pointer records saying epoch) gives today's layout, which the
    trainer then reads with no fallback of its own; today's layout passes through unchanged."""
    import torch

    from scaleclr.interchange.checkpoints import migrate_checkpoint, migrate_record

    rng = torch.get_rng_state()
    old = {"train_state": {"epoch": 2, "iteration": 13, "iteration_in_epoch": 3}, "iters_per_epoch": 5,
           "rng_cpu": rng, "world_size": 1}
    new = migrate_checkpoint(old, global_batch_size=8)
    assert new["train_state"] == {"epochs_done": 2, "step": 13, "step_in_epoch": 3}
    assert new["steps_per_epoch"] == 5 and "iters_per_epoch" not in new
    assert new["sampler"] == {"epoch": 2, "consumed_samples": 24}
    assert torch.equal(new["rng"]["cpu"][0], rng) and new["rng"]["cuda"] == [None] and "rng_cpu" not in new
    assert "epoch" in old["train_state"] and "rng_cpu" in old  # the input is not modified
    current = {"train_state": new["train_state"], "steps_per_epoch": 5, "sampler": {"epoch": 2, "x": 1},
               "rng": new["rng"]}
    assert migrate_checkpoint(current, global_batch_size=8) == current
    assert migrate_record({"path": "p", "epoch": 4})["epochs_done"] == 4
    assert migrate_record({"path": "p", "epochs_done": 4, "epoch": 9})["epochs_done"] == 4
