"""Heavy optional dependencies are imported in one module each; `import scaleclr` needs none of them;
model code knows nothing of distribution."""
import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "scaleclr"
ALLOWED = {"deepspeed": {"engines/deepspeed.py"}, "triton": {"kernels/infonce_triton.py"},
           "apex": {"distributed/sync_bn.py"}}


def imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_optional_dependencies_are_imported_in_one_module_each():
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).as_posix()
        for mod in imported_modules(f):
            top = mod.split(".")[0]
            if top in ALLOWED:
                assert rel in ALLOWED[top], f"{rel} imports {mod}; only {ALLOWED[top]} may"


def test_models_never_import_torch_distributed():
    for f in (PKG / "models").glob("*.py"):
        mods = list(imported_modules(f))
        assert not any(m.startswith(("torch.distributed", "scaleclr.distributed", "scaleclr.engines"))
                       for m in mods), (f, mods)


def test_import_scaleclr_without_deepspeed_or_apex():
    code = ("import sys\n"
            "sys.modules['deepspeed'] = None; sys.modules['apex'] = None  # as if not installed\n"
            "import scaleclr, scaleclr.models, scaleclr.losses, scaleclr.optim, scaleclr.data, scaleclr.config\n"
            "import scaleclr.trainer, scaleclr.main, scaleclr.engines.ddp, scaleclr.distributed.sync_bn\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
