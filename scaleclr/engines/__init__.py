"""Training engines, one per file behind :class:`scaleclr.engines.base.Engine`.

``build_engine`` imports the chosen engine lazily, so DeepSpeed is imported only when it is used.
"""
from scaleclr.engines.base import Engine
from scaleclr.engines.spec import EngineSpec, FSDPSpec, PrecisionSpec

ENGINES = ("ddp", "deepspeed", "fsdp")


def build_engine(spec: EngineSpec, device, rank: int, world_size: int) -> Engine:
    if spec.name == "ddp":
        from scaleclr.engines.ddp import DDPEngine as cls
    elif spec.name == "deepspeed":
        from scaleclr.engines.deepspeed import DeepSpeedEngine as cls
    elif spec.name == "fsdp":
        from scaleclr.engines.fsdp import FSDPEngine as cls
    else:
        raise ValueError(f"config.DISTRIBUTED.ENGINE={spec.name!r}; allowed: {', '.join(ENGINES)}")
    return cls(spec, device, rank, world_size)


__all__ = ["Engine", "EngineSpec", "FSDPSpec", "PrecisionSpec", "ENGINES", "build_engine"]
