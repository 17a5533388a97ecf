"""Every key the schema accepts does something, or says that it does not.

For each leaf of the schema: either some module of scaleclr other than the schema reads it (every component of
its dotted path appears as an attribute or subscript name in that code), or ``scaleclr.config.policy.POLICIES``
has an entry saying what happens when it is set (error or warning). The policies themselves are checked: an
``error`` entry stops the run naming the key, a ``warn`` entry logs it, and the default values pass silently.
"""
import ast
import logging
import pathlib

import pytest

from scaleclr.config import ConfigError, load_config
from scaleclr.config.compose import all_keys
from scaleclr.config.policy import POLICIES

PKG = pathlib.Path(__file__).resolve().parents[1] / "scaleclr"
QUICK = "config=test/integration_test/quick_simclr_synthetic"


def _reader_names(exclude=("config/schema.py", "config/policy.py")):
    """Attribute names and identifier-like string subscripts used anywhere in scaleclr outside the schema."""
    names = set()
    for f in PKG.rglob("*.py"):
        if f.relative_to(PKG).as_posix() in exclude:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)
    return names


def _leaves():
    keys = all_keys()
    return [k for k in keys if not any(other.startswith(k + ".") for other in keys)]


def unhandled_keys(policies=POLICIES, names=None):
    names = _reader_names() if names is None else names
    table = {p.key for p in policies}
    out = []
    for key in _leaves():
        parts = key.split(".")[1:] if key.startswith("config.") else key.split(".")
        if key not in table and not all(p in names for p in parts):
            out.append(key)
    return out


def test_every_schema_key_has_a_reader_or_a_policy():
    missing = unhandled_keys()
    assert not missing, f"keys with neither a reader nor an entry in scaleclr/config/policy.py: {missing}"


def test_removing_a_policy_entry_is_caught():
    """Negative control: without its table entry, an unread VISSL key (TRAIN_STEP_NAME) is reported."""
    without = [p for p in POLICIES if p.key != "config.TRAINER.TRAIN_STEP_NAME"]
    assert unhandled_keys(without) == ["config.TRAINER.TRAIN_STEP_NAME"]


def test_docs_list_the_policy_table():
    """docs/configuration.md holds the table generated from POLICIES, verbatim."""
    from scaleclr.config.policy import policy_table

    readme = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert policy_table() in readme, "regenerate docs/configuration.md's table with scaleclr.config.policy.policy_table()"


def test_policy_keys_exist_in_the_schema():
    keys = set(all_keys())
    assert not [p.key for p in POLICIES if p.key not in keys]
    assert {p.action for p in POLICIES} <= {"error", "warn"}


@pytest.mark.parametrize("override,key", [
    ("config.TRAINER.TRAIN_STEP_NAME=custom_step", "config.TRAINER.TRAIN_STEP_NAME"),
    ("config.MODEL.INPUT_TYPE=bgr", "config.MODEL.INPUT_TYPE"),
])
def test_error_policies_stop_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([QUICK, override])


def test_amp_type_apex_is_an_error_pointing_at_pytorch():
    with pytest.raises(ConfigError, match="AMP_TYPE=pytorch"):
        load_config([QUICK, "config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=apex"])
    load_config([QUICK, "config.MODEL.AMP_PARAMS.AMP_TYPE=apex"])  # VISSL's default, AMP off: fine


@pytest.mark.parametrize("override,key", [
    ("config.HOOKS.PERF_STATS.MONITOR_PERF_STATS=True", "config.HOOKS.PERF_STATS.MONITOR_PERF_STATS"),
    ("config.DATA.TEST.SHUFFLE_MODE=shard_block", "config.DATA.TEST.SHUFFLE_MODE"),
])
def test_warn_policies_log_the_key(override, key, caplog):
    with caplog.at_level(logging.WARNING):
        load_config([QUICK, override])
    assert any(key in r.getMessage() and "not implemented" in r.getMessage() for r in caplog.records)


def test_defaults_pass_silently(caplog):
    with caplog.at_level(logging.WARNING):
        load_config([QUICK])
    assert not [r for r in caplog.records if "not implemented" in r.getMessage()]


def test_inferred_value_contradicted_on_the_command_line_is_an_error():
    key = "config.LOSS.simclr_info_nce_loss.buffer_params.effective_batch_size"
    with pytest.raises(ConfigError, match="infers 16"):
        load_config([QUICK, f"{key}=100"])
    load_config([QUICK, f"{key}=16"])  # agreeing with the inference is fine
