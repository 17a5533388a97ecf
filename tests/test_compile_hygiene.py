"""torch.compile hygiene, read from dynamo's own counters (never log text), on CPU with backend aot_eager.

For each case the checks (``check_compiled``) are:

* no graph break: ``counters["graph_break"]`` empty;
* no recompile-limit hit: no ``"Dynamo recompile limit exceeded"`` in ``counters["unimplemented"]`` and every
  frame dynamo started compiling was compiled (``counters["frames"]``: total == ok);
* static shapes: no graph input has a symbolic size (a recording backend in front of aot_eager reads the
  placeholders' fake values);
* one graph per distinct (block structure, input shape): ``counters["stats"]["unique_graphs"]`` equals the number
  of distinct (type, repr, input shape) of the compiled modules, seen by forward pre-hooks on an eager run (and,
  for ResNet-50 with two heads, the number worked out by hand: 8 block structures x resolutions + 2 heads x
  batch shapes).

Cases: ResNet-50 two views (32 px), then multicrop (2 x 32 px + 4 x 16 px), batch 2, forward only (the counters are
the same as in training; backward only adds aot_autograd's work); ResNet-101 and ResNet-50 x2 (slow: the same code,
more blocks per region); a DDP and an FSDP2 (with activation checkpointing) engine (ResNet-18, scaleclr SyncBN over a
1-rank gloo group, two training steps; step 1 also equals the eager engine's within ``numerics.check_step1``).
Negative control: the old per-block ``module.compile()`` makes symbolic shapes on ResNet-50 two views and hits the
recompile limit on multicrop, and the checks catch both (the positive cases fail with it too). DeepSpeed refuses
compile (a ConfigError); SyncBN under compile is scaleclr's (torch's breaks graphs).
"""
import dataclasses

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import free_symbols

QUICK = "config=test/integration_test/quick_simclr_synthetic"
SIMCLR_HEADS = [["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}],
                ["mlp", {"dims": [2048, 128]}]]
TWO_VIEW = [(2, 32)]  # (crops, px) per resolution
MULTICROP = [(2, 32), (4, 16)]
BATCH = 2


class RecordingBackend:
    """aot_eager, recording the symbolic sizes of every graph's inputs (dynamic shapes leave SymInts there)."""

    __name__ = "aot_eager+recorder"

    def __init__(self):
        self.symbols = set()
        self.graphs = 0
        self._aot_eager = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.meta.get("example_value") is not None:
                self.symbols |= free_symbols(node.meta["example_value"])
        return self._aot_eager(gm, example_inputs)


@pytest.fixture
def recorder():
    torch._dynamo.reset()
    counters.clear()
    yield RecordingBackend()
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture
def one_rank_gloo():
    """A 1-rank gloo group for the engines and SyncBN, destroyed afterwards (other files expect none)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def distinct_block_shapes(units, runs) -> list:
    """Distinct (type, repr, input shape) over ``units``, cumulated after each of ``runs`` (eager calls)."""
    seen, counts = set(), []
    hooks = [u.register_forward_pre_hook(lambda m, args: seen.add((type(m), repr(m), tuple(args[0].shape))))
             for u in units]
    for run in runs:
        run()
        counts.append(len(seen))
    for h in hooks:
        h.remove()
    return counts


def check_compiled(recorder: RecordingBackend, expected_graphs: int) -> None:
    """The four checks of the module docstring (AssertionError naming what failed)."""
    breaks = dict(counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    limit_hits = [k.splitlines()[0] for k in counters["unimplemented"] if "recompile limit" in k.lower()]
    assert not limit_hits, f"recompile limit hit: {limit_hits}"
    frames = counters["frames"]
    assert frames["total"] == frames["ok"], f"frames that fell back to eager: {dict(frames)}"
    assert not recorder.symbols, f"dynamic shapes: {len(recorder.symbols)} symbols {sorted(map(str, recorder.symbols))}"
    assert counters["stats"]["unique_graphs"] == recorder.graphs == expected_graphs, \
        f"{counters['stats']['unique_graphs']} graphs, expected {expected_graphs} (one per block structure and shape)"


def old_compile(model, backend):
    """The compile of scaleclr before the fix: ``module.compile()`` per block and head (negative control)."""
    from scaleclr.distributed.compile import compile_units

    for unit in compile_units(model):
        unit.compile(backend=backend)


def _simclr_model(depth=50, width=1):
    from scaleclr.models.heads import build_heads
    from scaleclr.models.resnet import ResNet
    from scaleclr.models.simclr import SimCLRModel

    torch.manual_seed(0)
    heads = build_heads([[name, dict(kw, dims=[d * width if d == 2048 else d for d in kw["dims"]])]
                         for name, kw in SIMCLR_HEADS])
    return SimCLRModel(ResNet(depth=depth, width_multiplier=width), heads)


def _crops(resolutions):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, 3, px, px, generator=g) for n, px in resolutions for _ in range(n)]


def _forward_steps(recorder, depth, width, compile_fn=None):
    """Two-view steps, then multicrop steps (whose 32 px crops have the two-view shapes) on one compiled model,
    forward only; yields the expected graph count after each phase (counted on an eager run first)."""
    from scaleclr.distributed.compile import apply_compile, compile_units

    model = _simclr_model(depth, width)
    steps = [lambda crops=_crops(resolutions): model(crops) for resolutions in (TWO_VIEW, MULTICROP)]
    with torch.no_grad():
        expected = distinct_block_shapes(compile_units(model), steps)
        (compile_fn or (lambda m, backend: apply_compile(m, backend=backend)))(model, recorder)
        for step, count in zip(steps, expected):
            step()
            step()  # a second step compiles nothing new
            yield count


def test_resnet50_compiles_one_static_graph_per_block_structure_and_shape(recorder):
    # 4 stages x 2 block structures (the first block, the others) per resolution, 2 heads per concatenated batch:
    # two views 8 + 2; multicrop adds the 16 px blocks (8) and the heads on 6 crops (2); its 32 px crops reuse.
    for expected, by_hand in zip(_forward_steps(recorder, 50, 1), (8 + 2, 8 + 2 + 8 + 2)):
        assert expected == by_hand
        check_compiled(recorder, expected)


@pytest.mark.slow
@pytest.mark.parametrize("depth,width", [(101, 1), (50, 2)], ids=["r101", "r50w2"])
def test_deeper_and_wider_trunks_compile_one_static_graph_per_block_structure_and_shape(recorder, depth, width):
    for expected in _forward_steps(recorder, depth, width):
        check_compiled(recorder, expected)


def test_negative_control_per_block_module_compile_hits_the_recompile_limit_with_dynamic_shapes(recorder):
    phases = _forward_steps(recorder, 50, 1, compile_fn=old_compile)
    with pytest.raises(AssertionError, match="dynamic shapes"):  # the 2nd shape of Bottleneck.forward: automatic
        check_compiled(recorder, next(phases))  # dynamic makes the recompile symbolic
    with pytest.raises(AssertionError, match="recompile limit hit"):  # 16 block graphs share 8 entries
        check_compiled(recorder, next(phases))


# ---------------------------------------------------------------------------------------------------- engines
AC = ["config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=True"]


def _engine_run(name, recorder=None, extra=()):
    """Two training steps of the quick config's model (ResNet-18, two MLP heads, scaleclr SyncBN over a 1-rank gloo
    group) on ``name``'s engine, compiled with ``recorder`` (eager when None). Returns the run (``losses``, the state
    after step 1, ``init``: numerics' run format) and the distinct (block structure, shape) count."""
    from scaleclr import builders
    from scaleclr.config import load_config
    from scaleclr.distributed.compile import compile_units
    from scaleclr.distributed.sync_bn import SyncBatchNorm, convert_sync_batchnorm
    from scaleclr.engines import build_engine

    root, _ = load_config([QUICK, f"config.DISTRIBUTED.ENGINE={name}", "config.MODEL.TORCH_COMPILE=True",
                           "config.MODEL.TORCH_COMPILE_BACKEND=aot_eager", *extra])
    c, cpu = root.config, torch.device("cpu")
    spec = builders.build_engine_spec(c, 1, cpu)
    spec = dataclasses.replace(spec, precision=dataclasses.replace(spec.precision, compile=recorder is not None,
                                                                   compile_backend=recorder))
    model = convert_sync_batchnorm(builders.build_model(c), "native", device=cpu)
    assert any(isinstance(m, SyncBatchNorm) for m in model.modules())
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    crops = _crops(TWO_VIEW)
    [expected] = distinct_block_shapes(compile_units(model), [lambda: model(crops)])
    model.load_state_dict(init)  # undo the counting forward's BN statistics
    engine = build_engine(spec, cpu, 0, 1)
    engine.setup(model, builders.make_optimizer_factory(c))
    run = {"losses": [], "states": {}, "init": init}
    for step in (1, 2):  # the second step compiles nothing new
        loss = engine.model(crops).square().mean()  # stands in for the loss (the loss is not compiled)
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        run["losses"].append(loss.item())
        if step == 1:
            run["states"][1] = {k: v.detach().clone() for k, v in engine.full_state_dict().items()}
    return run, expected


@pytest.mark.parametrize("engine,extra", [("ddp", ()), ("fsdp", AC)], ids=["ddp", "fsdp_checkpointed"])
def test_engines_compile_blocks_with_sync_bn_without_breaks_or_dynamic_shapes(one_rank_gloo, recorder, engine,
                                                                           extra):
    """FSDP2 with activation checkpointing (torchtitan's order: checkpoint, compile, shard): the recomputation in
    backward reuses the blocks' graphs."""
    import numerics as nm

    compiled, expected = _engine_run(engine, recorder, extra)
    assert expected == 7 + 2  # ResNet-18: layer1's blocks are alike, 2 structures in each other stage; 2 heads
    check_compiled(recorder, expected)
    eager, _ = _engine_run(engine, extra=extra)
    nm.assert_ok(nm.check_step1(compiled, eager, f"{engine} compiled (aot_eager) vs eager", eager["init"]))


# ----------------------------------------------------------------------------------------- SyncBN, DeepSpeed
@pytest.mark.parametrize("compile_on,expected", [(True, "SyncBatchNorm"), (False, "torch.nn.SyncBatchNorm")])
def test_compile_converts_to_scaleclr_sync_bn_instead_of_torchs(compile_on, expected):
    """torch's SyncBN filters the gathered statistics with a boolean mask (a value-dependent shape: a graph break
    and a host sync per layer; its kernels need CUDA, so that is read from torch/nn/modules/_functions.py, not run
    here). With compile on the trainer converts to scaleclr's; compile off keeps torch's (the control)."""
    from scaleclr.distributed.compile import sync_bn_type_for_compile
    from scaleclr.distributed.sync_bn import SyncBatchNorm, convert_sync_batchnorm

    assert sync_bn_type_for_compile("apex", compile_on) == ("native" if compile_on else "apex")
    assert sync_bn_type_for_compile("native", compile_on) == "native"
    sync_bn_type = sync_bn_type_for_compile("pytorch", compile_on)
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), sync_bn_type,
                                   device="cuda")  # a CUDA target: where torch's SyncBN would be chosen
    cls = {"SyncBatchNorm": SyncBatchNorm, "torch.nn.SyncBatchNorm": nn.SyncBatchNorm}[expected]
    assert type(model[1]) is cls


@pytest.mark.parametrize("engine,compile_on,refused", [("deepspeed", True, True), ("deepspeed", False, False),
                                                       ("ddp", True, False)])
def test_compile_with_deepspeed_is_refused_naming_the_keys(engine, compile_on, refused):
    from scaleclr.config import ConfigError, load_config

    overrides = [QUICK, f"config.DISTRIBUTED.ENGINE={engine}", f"config.MODEL.TORCH_COMPILE={compile_on}"]
    if refused:
        with pytest.raises(ConfigError, match=r"config\.MODEL\.TORCH_COMPILE.*ENGINE=deepspeed"):
            load_config(overrides)
    else:
        load_config(overrides)
