"""Training engines, one per file behind :class:`scaleclr.engines.base.Engine`.

``build_engine`` imports the chosen engine lazily, so DeepSpeed is imported only when it is used.
"""
from scaleclr.engines.base import Engine

ENGINES = ("ddp", "deepspeed", "fsdp")


def build_engine(name: str, cfg, device, rank: int, world_size: int) -> Engine:
    if name == "ddp":
        from scaleclr.engines.ddp import DDPEngine as cls
    elif name == "deepspeed":
        from scaleclr.engines.deepspeed import DeepSpeedEngine as cls
    elif name == "fsdp":
        from scaleclr.engines.fsdp import FSDPEngine as cls
    else:
        raise ValueError(f"config.DISTRIBUTED.ENGINE={name!r}; allowed: {', '.join(ENGINES)}")
    return cls(cfg, device, rank, world_size)


__all__ = ["Engine", "ENGINES", "build_engine"]
