"""Layering rules, enforced on every import statement of the package, relative ones included:

- heavy optional dependencies (deepspeed, triton, apex, submitit) are imported in one module each, and
  ``import scaleclr`` works without them;
- model code knows nothing of distribution, engines or the config machinery;
- engines import nothing from the trainer-level modules (trainer, checkpoint, metrics, builders, main) nor the
  config tree (they receive an ``EngineSpec``);
- the library layers below the trainer (losses, kernels, optim, data, distributed, eval, io) import neither
  trainer-level modules nor engines.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "scaleclr"
ALLOWED = {"deepspeed": {"engines/deepspeed.py"}, "triton": {"kernels/infonce_triton.py"},
           "apex": {"distributed/sync_bn.py"}, "submitit": {"slurm.py"}}
TRAINER_LEVEL = ("scaleclr.trainer", "scaleclr.checkpoint", "scaleclr.metrics", "scaleclr.builders", "scaleclr.main",
                 "scaleclr.preflight",
                 "scaleclr.tasks", "scaleclr.summary")
CONFIG = ("scaleclr.config", "hydra", "omegaconf")
RULES = {  # package folder -> forbidden module prefixes
    "models": TRAINER_LEVEL + CONFIG + ("torch.distributed", "scaleclr.distributed", "scaleclr.engines"),
    "engines": TRAINER_LEVEL + CONFIG,
    "losses": TRAINER_LEVEL + ("scaleclr.engines",),
    "kernels": TRAINER_LEVEL + ("scaleclr.engines",),
    "optim": TRAINER_LEVEL + ("scaleclr.engines",),
    "data": TRAINER_LEVEL + ("scaleclr.engines",),
    "distributed": TRAINER_LEVEL + ("scaleclr.engines",),
    "eval": TRAINER_LEVEL + ("scaleclr.engines",),
    "io.py": TRAINER_LEVEL + ("scaleclr.engines",),
}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: pathlib.Path, source: str = None):
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    tree = ast.parse(source if source is not None else path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            else:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)  # `from scaleclr import trainer`


def violations(path: pathlib.Path, source: str = None):
    rel = path.relative_to(PKG).as_posix()
    found = []
    rule_key = rel.split("/")[0]
    forbidden = RULES.get(rule_key, ())
    for mod in imported_modules(path, source):
        top = mod.split(".")[0]
        if top in ALLOWED and rel not in ALLOWED[top]:
            found.append(f"{rel} imports {mod}; only {sorted(ALLOWED[top])} may")
        for f in forbidden:
            if mod == f or mod.startswith(f + "."):
                found.append(f"{rel} imports {mod} ({rule_key} must not import {f})")
    return found


def test_layering_rules_hold_for_every_module():
    problems = [v for f in sorted(PKG.rglob("*.py")) for v in violations(f)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel,line", [
    ("engines/ddp.py", "from ..checkpoint import CheckpointManager"),
    ("engines/fsdp.py", "from scaleclr.metrics import MetricLogger"),
    ("engines/deepspeed.py", "from scaleclr.config import load_config"),
    ("losses/streaming.py", "from ..trainer import Trainer"),
    ("kernels/infonce_triton.py", "from ..engines import build_engine"),
    ("models/resnet.py", "from ..distributed import gather"),
    ("models/heads.py", "import torch.distributed as dist"),
    ("data/dataset.py", "import deepspeed"),
])
def test_each_rule_catches_a_violation(rel, line):
    """Negative controls: one added import line makes the rule fire (relative forms included)."""
    path = PKG / rel
    assert violations(path, path.read_text() + "\n" + line + "\n")


def test_import_scaleclr_without_deepspeed_or_apex():
    code = ("import sys\n"
            "sys.modules['deepspeed'] = None; sys.modules['apex'] = None  # as if not installed\n"
            "sys.modules['submitit'] = None\n"
            "import scaleclr, scaleclr.models, scaleclr.losses, scaleclr.optim, scaleclr.data, scaleclr.config\n"
            "import scaleclr.trainer, scaleclr.main, scaleclr.engines.ddp, scaleclr.distributed.sync_bn\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
