"""Typed schema of every configuration key, with VISSL's key names and defaults.

This module is the single source of defaults. The YAML files under ``configs/`` only supply values; Hydra
merges them over this schema in struct mode, so an unknown key or a value of the wrong type is an error
(``scaleclr.config.compose`` turns it into a :class:`~scaleclr.config.errors.ConfigError` that names the key
and the closest valid keys). Semantic checks (ranges, cross-key consistency) live in ``validate.py``;
values VISSL infers (world size, batch sizes, num_crops, scaled LR, head dims) are filled in ``infer.py``.

Key names follow VISSL (``config.MODEL.TRUNK.RESNETS.DEPTH``, ``config.LOSS.simclr_info_nce_loss.temperature``,
``config.OPTIMIZER.larc_config.clip``); keys scaleclr adds use the same style (``config.DISTRIBUTED.ENGINE``,
``config.LOSS.<loss>.impl``, ``config.OPTIMIZER.larc_config.exclude_bias_and_norm``,
``config.MODEL.FSDP_CONFIG.*``, ``config.KNN_EVAL.*``, ``config.MODEL.FEATURE_EVAL_SETTINGS.PRECOMPUTE_FEATURES``).
"""
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


def _default_transforms() -> List[Dict[str, Any]]:
    return [
        {"name": "ImgReplicatePil", "num_times": 2},
        {"name": "RandomResizedCrop", "size": 224},
        {"name": "RandomHorizontalFlip", "p": 0.5},
        {"name": "ImgPilColorDistortion", "strength": 1.0},
        {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    ]


# ----------------------------------------------------------------------------------------------- DATA
@dataclass
class DataSplitConfig:
    DATA_SOURCES: List[str] = field(default_factory=list)  # disk_folder | disk_filelist | synthetic | webdataset
    DATASET_NAMES: List[str] = field(default_factory=list)  # looked up in the dataset catalog
    DATA_PATHS: List[str] = field(default_factory=list)  # explicit paths win over DATASET_NAMES
    LABEL_SOURCES: List[str] = field(default_factory=list)
    LABEL_PATHS: List[str] = field(default_factory=list)
    LABEL_TYPE: str = "sample_index"
    BATCHSIZE_PER_REPLICA: int = 64  # images per process, before view duplication
    TRANSFORMS: List[Dict[str, Any]] = field(default_factory=_default_transforms)
    COLLATE_FUNCTION: str = "simclr_collator"
    MMAP_MODE: bool = True
    COPY_TO_LOCAL_DISK: bool = False  # webdataset: one process per node copies the shards there first
    COPY_DESTINATION_DIR: str = ""  # node-local folder; "" = $TMPDIR or /tmp
    SHUFFLE_MODE: str = "global"  # global | shard_block (webdataset: shards, then samples within windows)
    SHUFFLE_BLOCK_SHARDS: int = 8  # shard_block: shards per window
    DROP_LAST: bool = True
    DATA_LIMIT: int = -1  # > 0: keep the first N images (synthetic: number of images)
    SYNTHETIC_IMAGE_SIZE: int = 64  # side of the images the synthetic source draws
    # auto | on | off: two-stage data path (host: decode + crops + flips to uint8; device: batched colour,
    # blur, normalisation). auto = on exactly when training on CUDA.
    DEVICE_AUGMENTATION: str = "auto"


def _default_test_split() -> DataSplitConfig:
    """``config.DATA.TEST``: the labelled split linear evaluation reports top-k on (VISSL's second split). Its
    defaults are the ImageNet evaluation pipeline (Resize 256, CenterCrop 224, ToTensor, Normalize), the whole
    split (DROP_LAST False) and the source's labels; pretraining does not read it."""
    return DataSplitConfig(LABEL_TYPE="standard", DROP_LAST=False, TRANSFORMS=[
        {"name": "Resize", "size": 256}, {"name": "CenterCrop", "size": 224}, {"name": "ToTensor"},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}])


@dataclass
class DataConfig:
    NUM_DATALOADER_WORKERS: int = 5  # per process
    PIN_MEMORY: bool = True
    ENABLE_ASYNC_GPU_COPY: bool = True
    DDP_BUCKET_CAP_MB: int = 25
    TRAIN: DataSplitConfig = field(default_factory=DataSplitConfig)
    TEST: DataSplitConfig = field(default_factory=_default_test_split)


# ---------------------------------------------------------------------------------------------- MODEL
@dataclass
class ResNetsConfig:
    DEPTH: int = 50
    WIDTH_MULTIPLIER: int = 1
    NORM: str = "BatchNorm"
    GROUPS: int = 1
    WIDTH_PER_GROUP: int = 64
    ZERO_INIT_RESIDUAL: bool = False
    LAYER4_STRIDE: int = 2


@dataclass
class TrunkConfig:
    NAME: str = "resnet"
    RESNETS: ResNetsConfig = field(default_factory=ResNetsConfig)


def _default_head() -> List[Any]:
    return [["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}],
            ["mlp", {"dims": [2048, 128]}]]


@dataclass
class HeadConfig:
    PARAMS: List[Any] = field(default_factory=_default_head)
    BATCHNORM_EPS: float = 1e-5
    BATCHNORM_MOMENTUM: float = 0.1
    PARAMS_MULTIPLIER: float = 1.0


@dataclass
class SyncBNConfig:
    CONVERT_BN_TO_SYNC_BN: bool = False
    SYNC_BN_TYPE: str = "pytorch"  # pytorch | apex | native (scaleclr's own, works on gloo)
    GROUP_SIZE: int = -1  # -1: processes of one node; 0: whole world; k > 0: groups of k contiguous ranks


@dataclass
class AmpConfig:
    USE_AMP: bool = False
    AMP_TYPE: str = "apex"  # apex | pytorch (VISSL's default is apex)
    AMP_ARGS: Dict[str, Any] = field(default_factory=lambda: {"opt_level": "O1"})
    AMP_DTYPE: str = "float16"  # float16 (with a grad scaler) | bfloat16; used by AMP_TYPE=pytorch


@dataclass
class ActivationCheckpointingConfig:
    USE_ACTIVATION_CHECKPOINTING: bool = False


@dataclass
class FSDPConfig:
    SHARD_UNIT: str = "block"  # block | stage
    RESHARD_AFTER_FORWARD: bool = True
    MIXED_PRECISION: str = "none"  # none | bfloat16 | float16 (params); reduction stays fp32
    HSDP_REPLICATE: int = 1  # > 1: 2-D mesh (replicate x shard), shard inside a node


@dataclass
class WeightsInitConfig:
    """VISSL's ``MODEL.WEIGHTS_INIT`` (same keys, defaults and meanings; see scaleclr.interchange.weights_init)."""
    PARAMS_FILE: str = ""  # weights file (scaleclr / VISSL / torchvision) or scaleclr FSDP/DeepSpeed checkpoint dir
    # key (or list of nested keys) holding the weights; "" = flat {name: tensor} file. With classy_state_dict
    # (VISSL layout) REMOVE_PREFIX/APPEND_PREFIX are ignored, as in VISSL. Any: a str or a list of str.
    STATE_DICT_KEY_NAME: Any = "classy_state_dict"
    SKIP_LAYERS: List[str] = field(default_factory=lambda: ["num_batches_tracked"])  # substring match
    REMOVE_PREFIX: str = ""  # removed from keys that start with it, before APPEND_PREFIX
    APPEND_PREFIX: str = ""  # put in front of every key (torchvision files: trunk.)


@dataclass
class FeatureEvalSettingsConfig:
    """VISSL's ``MODEL.FEATURE_EVAL_SETTINGS`` (linear evaluation of a frozen trunk; scaleclr.eval.linear)."""
    EVAL_MODE_ON: bool = False  # evaluate features: with FREEZE_TRUNK_ONLY, linear evaluation
    FREEZE_TRUNK_ONLY: bool = False  # trunk frozen (eval-mode BatchNorm, no gradients), heads trained
    FREEZE_TRUNK_AND_HEAD: bool = False  # VISSL's feature extraction; not implemented (an error)
    EVAL_TRUNK_AND_HEAD: bool = False  # WEIGHTS_INIT also loads the heads (e.g. a linear-eval checkpoint)
    SHOULD_FLATTEN_FEATS: bool = True  # False: the head gets [N, F, 1, 1] (VISSL's res5avg), True: [N, F]
    # [[feature, [pool op, args]], ...], one entry per head; only ["res5avg", ["Identity", []]] (the final
    # average pool, 2048 x width) is implemented; [] = the trunk's output, the same feature
    LINEAR_EVAL_FEAT_POOL_OPS_MAP: List[Any] = field(default_factory=list)
    # scaleclr: extract the frozen features of DATA.TRAIN / DATA.TEST once (their TRANSFORMS must then be
    # deterministic) and train the classifier on them; for small demos, never for the ImageNet protocols
    PRECOMPUTE_FEATURES: bool = False


@dataclass
class ModelConfig:
    TRUNK: TrunkConfig = field(default_factory=TrunkConfig)
    HEAD: HeadConfig = field(default_factory=HeadConfig)
    SYNC_BN_CONFIG: SyncBNConfig = field(default_factory=SyncBNConfig)
    AMP_PARAMS: AmpConfig = field(default_factory=AmpConfig)
    ACTIVATION_CHECKPOINTING: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig)
    FSDP_CONFIG: FSDPConfig = field(default_factory=FSDPConfig)
    WEIGHTS_INIT: WeightsInitConfig = field(default_factory=WeightsInitConfig)
    FEATURE_EVAL_SETTINGS: FeatureEvalSettingsConfig = field(default_factory=FeatureEvalSettingsConfig)
    NON_TRAINABLE_PARAMS: List[str] = field(default_factory=list)
    INPUT_TYPE: str = "rgb"
    CHANNELS_LAST: str = "auto"  # auto (on with CUDA) | on | off: model and input batches in channels_last
    TORCH_COMPILE: bool = False  # compile the blocks and heads, static shapes (DDP, FSDP2; DeepSpeed: error)
    TORCH_COMPILE_MODE: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    TORCH_COMPILE_BACKEND: str = "inductor"  # inductor | aot_eager (traces, no code generation: debugging)
    # scaleclr.plan's prediction before the model is built (CUDA): warn | error (exit 2) | off
    MEMORY_CHECK: str = "warn"
    # CUDA only (the worker sets them before the model is built; nothing changes on CPU): cuDNN autotuning of
    # convolutions (fixed input sizes) and torch.set_float32_matmul_precision (highest = fp32, high = TF32)
    CUDNN_BENCHMARK: bool = True
    FLOAT32_MATMUL_PRECISION: str = "high"  # highest | high | medium


# ----------------------------------------------------------------------------------------------- LOSS
@dataclass
class BufferParamsConfig:
    embedding_dim: int = 128
    effective_batch_size: int = 0  # inferred: rows of the gathered batch
    world_size: int = 0  # inferred from the true world


@dataclass
class SimclrLossConfig:
    temperature: float = 0.1
    buffer_params: BufferParamsConfig = field(default_factory=BufferParamsConfig)
    impl: str = "reference"  # reference | streaming | triton | auto


@dataclass
class MulticropSimclrLossConfig:
    temperature: float = 0.1
    num_crops: int = 2  # inferred from ImgPilToMultiCrop.total_num_crops
    buffer_params: BufferParamsConfig = field(default_factory=BufferParamsConfig)
    negatives: str = "global"  # global (every rank's other images) | local (VISSL: this rank's only)
    impl: str = "reference"


@dataclass
class CrossEntropyLossConfig:
    """VISSL's ``cross_entropy_multiple_output_single_target`` (linear evaluation; scaleclr.losses.cross_entropy)."""
    ignore_index: int = -1
    temperature: float = 1.0  # logits / temperature
    normalize_output: bool = False  # L2-normalise the logits first
    label_smoothing: float = 0.0


@dataclass
class LossConfig:
    name: str = "simclr_info_nce_loss"
    simclr_info_nce_loss: SimclrLossConfig = field(default_factory=SimclrLossConfig)
    multicrop_simclr_info_nce_loss: MulticropSimclrLossConfig = field(
        default_factory=MulticropSimclrLossConfig)
    cross_entropy_multiple_output_single_target: CrossEntropyLossConfig = field(
        default_factory=CrossEntropyLossConfig)


# ------------------------------------------------------------------------------------------ OPTIMIZER
@dataclass
class LarcConfig:
    clip: bool = False
    trust_coefficient: float = 0.001
    eps: float = 1e-8
    exclude_bias_and_norm: bool = False  # SimCLR/BYOL: 1-d params skip adaptation and weight decay


@dataclass
class HeadOptimizerConfig:
    use_different_lr: bool = False
    use_different_wd: bool = False
    weight_decay: float = 1e-6


def _default_lr_schedule() -> Dict[str, Any]:
    # Free-form (VISSL/fvcore scheduler dicts); config files merge into it key by key.
    return {"auto_lr_scaling": {"auto_scale": False, "base_value": 0.1, "base_lr_batch_size": 256,
                                "scaling_type": "linear"},
            "name": "constant", "value": 0.1, "update_interval": "step"}


@dataclass
class ParamSchedulersConfig:
    lr: Dict[str, Any] = field(default_factory=_default_lr_schedule)
    # the head's schedule with head_optimizer_params.use_different_lr (VISSL); same keys as lr
    lr_head: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    use_larc: bool = False
    larc_config: LarcConfig = field(default_factory=LarcConfig)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    num_epochs: int = 90
    regularize_bn: bool = True
    regularize_bias: bool = True
    head_optimizer_params: HeadOptimizerConfig = field(default_factory=HeadOptimizerConfig)
    non_regularized_parameters: List[str] = field(default_factory=list)
    param_schedulers: ParamSchedulersConfig = field(default_factory=ParamSchedulersConfig)
    gradient_clipping: float = 0.0  # max global grad norm; 0 = off (DeepSpeed's JSON "auto" takes it)


# ---------------------------------------------------------------------------------------- DISTRIBUTED
@dataclass
class DistributedConfig:
    BACKEND: str = "nccl"  # nccl | gloo (nccl falls back to gloo without CUDA)
    NUM_NODES: int = 1
    NUM_PROC_PER_NODE: int = 1
    RUN_ID: str = "auto"  # host:port for tcp multi-node; "auto" picks a free local port
    INIT_METHOD: str = "tcp"  # tcp | env | file
    NCCL_DEBUG: bool = False
    BROADCAST_BUFFERS: bool = True
    ENGINE: str = "ddp"  # ddp | deepspeed | fsdp
    DEEPSPEED_CONFIG: str = ""  # path to a ds_configs/*.json (or --deepspeed_config)
    TIMEOUT_SECONDS: int = 1800  # collective timeout: a dead rank ends the job instead of hanging


@dataclass
class MachineConfig:
    DEVICE: str = "gpu"  # gpu | cpu (gpu falls back to cpu, with a warning, when CUDA is absent)


@dataclass
class CheckpointConfig:
    DIR: str = "."
    AUTO_RESUME: bool = True
    CHECKPOINT_FREQUENCY: int = 1  # epochs
    CHECKPOINT_ITER_FREQUENCY: int = -1  # > 0: also every N iterations (mid-epoch, exact resume)
    OVERWRITE_EXISTING: bool = False
    LATEST_CHECKPOINT_RESUME_FILE_NUM: int = 1
    APPEND_DISTR_RUN_ID: bool = False
    # >= 0: keep the last KEEP_LAST model_iteration* checkpoints (and every epoch checkpoint VISSL's
    # CHECKPOINT_FREQUENCY rule keeps, the final one, and the one 'latest' points at); -1: keep all
    KEEP_LAST: int = -1
    # a checkpoint that cannot be read at resume (missing, truncated, corrupt): `fallback` warns naming it and
    # resumes from the newest readable one (nothing is deleted); `error` stops the run (exit status 2)
    ON_CORRUPT: str = "fallback"
    # the run directory's lock (.scaleclr.lock, one run per CHECKPOINT.DIR): a lock written on another host
    # and not refreshed for this many minutes is taken over (the owner refreshes it every minute)
    LOCK_STALE_MINUTES: float = 10.0


@dataclass
class TensorboardConfig:
    USE_TENSORBOARD: bool = True


@dataclass
class PerfStatsConfig:
    MONITOR_PERF_STATS: bool = False
    ROLLING_BTIME_FREQ: int = -1
    PERF_STAT_FREQUENCY: int = -1


@dataclass
class HooksConfig:
    PERF_STATS: PerfStatsConfig = field(default_factory=PerfStatsConfig)
    TENSORBOARD_SETUP: TensorboardConfig = field(default_factory=TensorboardConfig)
    CHECK_NAN: bool = True


@dataclass
class TrainerConfig:
    TRAIN_STEP_NAME: str = "standard_train_step"
    MAX_ITERATIONS: int = -1  # > 0: stop after this many iterations (smoke runs); schedule unchanged
    # signals that make every rank finish its step, checkpoint it and exit 75 (resumable); [] = off.
    # SIGUSR1: slurm/train.sbatch's --signal=USR1@s before the time limit; SIGTERM: preemption, kill, torchrun
    STOP_SIGNALS: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])


@dataclass
class AccuracyListMeterConfig:
    num_meters: int = 1  # inferred: one per head
    topk_values: List[int] = field(default_factory=lambda: [1])  # linear_top{k} in metrics.jsonl


@dataclass
class MetersConfig:
    name: str = ""  # "" | accuracy_list_meter (linear evaluation)
    accuracy_list_meter: AccuracyListMeterConfig = field(default_factory=AccuracyListMeterConfig)


@dataclass
class KnnEvalConfig:
    """kNN top-1 of the trunk on a labelled split (Wu et al. 2018 weighted votes), at the start, the end and every
    EVERY_N_EPOCHS epochs; sharded over the ranks through the engine's model (exact)."""
    ENABLED: bool = False
    DATASET_NAME: str = ""  # catalog entry with train/val splits, e.g. scaleclr_demo_digits
    TRAIN_PATH: str = ""  # or explicit ImageFolder roots (or WebDataset shards: a folder of .tar or brace notation)
    VAL_PATH: str = ""
    TOPK: int = 20
    TEMPERATURE: float = 0.07
    IMAGE_SIZE: int = 224  # eval transform: resize to IMAGE_SIZE*8/7, center-crop IMAGE_SIZE
    BATCHSIZE: int = 256
    EVERY_N_EPOCHS: int = 0  # also after every N epochs (0: only at the start and the end)


@dataclass
class OnlineLinearProbeConfig:
    """A linear classifier on the detached trunk features of the training views, trained in the same step
    (solo-learn's online classifier); its top-1 on the kNN held-out split is reported with every kNN evaluation.
    Needs labelled training data (config.DATA.TRAIN.LABEL_TYPE=standard) and config.KNN_EVAL.ENABLED."""
    ENABLED: bool = False
    LR: float = 0.1  # constant, SGD
    MOMENTUM: float = 0.9
    WEIGHT_DECAY: float = 0.0


@dataclass
class SlurmConfig:
    """VISSL's submitit options (``config.SLURM.USE_SLURM=True``: train.py submits the run; see
    ``scaleclr.slurm``). Nodes and GPUs come from ``config.DISTRIBUTED`` (one task per node)."""
    USE_SLURM: bool = False
    NAME: str = "vissl"  # job name
    COMMENT: str = "vissl job"
    PARTITION: str = ""  # required with USE_SLURM
    LOG_FOLDER: str = "."  # submitit's folder: job scripts, pickles, stdout/stderr
    TIME_HOURS: int = 72
    TIME_MINUTES: int = 0
    CONSTRAINT: str = ""  # e.g. volta
    MEM_GB: int = 250  # per node
    PORT_ID: int = 40050  # rendezvous port on the first node
    NUM_CPU_PER_PROC: int = 8  # CPUs per GPU (the task gets NUM_CPU_PER_PROC x NUM_PROC_PER_NODE)
    ADDITIONAL_PARAMETERS: Dict[str, Any] = field(default_factory=dict)  # more sbatch options, submitit-style
    # scaleclr: seconds before the time limit at which SLURM sends the stop signal (submitit's signal_delay_s)
    SIGNAL_DELAY_S: int = 120
    MAX_NUM_TIMEOUT: int = 3  # scaleclr: how many times a job may reach its time limit and be requeued (submitit)


@dataclass
class Config:
    VERBOSE: bool = False
    LOG_FREQUENCY: int = 10
    TEST_ONLY: bool = False  # linear evaluation: evaluate DATA.TEST only (no training)
    TEST_MODEL: bool = False  # linear evaluation: test phases on DATA.TEST
    TEST_EVERY_NUM_EPOCH: int = 1  # a test phase after every N epochs (and after the last)
    SEED_VALUE: int = 0
    MULTI_PROCESSING_METHOD: str = "forkserver"
    HOOKS: HooksConfig = field(default_factory=HooksConfig)
    DATA: DataConfig = field(default_factory=DataConfig)
    TRAINER: TrainerConfig = field(default_factory=TrainerConfig)
    METERS: MetersConfig = field(default_factory=MetersConfig)
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    LOSS: LossConfig = field(default_factory=LossConfig)
    OPTIMIZER: OptimizerConfig = field(default_factory=OptimizerConfig)
    DISTRIBUTED: DistributedConfig = field(default_factory=DistributedConfig)
    MACHINE: MachineConfig = field(default_factory=MachineConfig)
    CHECKPOINT: CheckpointConfig = field(default_factory=CheckpointConfig)
    KNN_EVAL: KnnEvalConfig = field(default_factory=KnnEvalConfig)
    ONLINE_LINEAR_PROBE: OnlineLinearProbeConfig = field(default_factory=OnlineLinearProbeConfig)
    SLURM: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Root:
    """Top level of the composed tree: ``config`` plus VISSL's two top-level keys."""
    config: Config = field(default_factory=Config)
    node_id: int = 0
    engine_name: str = "train"


SCHEMA_NAME = "scaleclr_schema"


@functools.lru_cache(maxsize=1)
def defaults() -> DictConfig:
    """The schema's tree of defaults (``Root``), built once per process and read-only (building it costs
    ~0.3 s; validation, the key policies and key suggestions all read it)."""
    node = OmegaConf.structured(Root)
    OmegaConf.set_readonly(node, True)
    return node


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Root)

