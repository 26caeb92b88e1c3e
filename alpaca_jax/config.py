"""The run config: one frozen dataclass per concern, loaded from YAML with dotted overrides.

`load_config("configs/alpaca_7b.yaml", ["train.max_steps=10"])` returns a `Config`. With no
file, the embedded default `configs/tiny.yaml` (inside the package) is used, so `alpaca-jax
train` works out of the box. Dataclass defaults fill whatever a file leaves out. `model.preset` names a file in
`configs/model/` whose fields sit under any fields the run config sets itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from alpaca_jax import configlib
from alpaca_jax.configlib import ConfigError

__all__ = ["Config", "ModelConfig", "RopeScalingConfig", "TokenizerConfig", "DataConfig", "LoraConfig",
           "DataSourceConfig", "PreferenceConfig", "OptimizerConfig", "TrainConfig", "RunConfig", "MeshConfig", "DistributedConfig", "CheckpointConfig",
           "ConfigError",
           "load_config", "config_from_dict", "save_config", "CONFIG_DIR", "MODEL_PRESET_DIR"]

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_PRESET_DIR = CONFIG_DIR / "model"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"

DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """LLaMA-3.1 style frequency-dependent rotary scaling (HF `rope_type: llama3`)."""
    factor: float = 8.0                             # how much longer than the original context
    low_freq_factor: float = 1.0                    # wavelengths above ctx/low are divided by factor
    high_freq_factor: float = 4.0                   # wavelengths below ctx/high are left alone
    original_max_position_embeddings: int = 8192    # context length the base model was trained on


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA shape and numerics. Defaults are the `tiny` preset."""
    preset: str | None = None              # name of a file in configs/model/ supplying defaults
    vocab_size: int = 2048                 # rows of the embedding table (>= tokenizer size)
    hidden_size: int = 128                 # model width D
    intermediate_size: int = 352           # SwiGLU inner width F
    num_layers: int = 4                    # transformer blocks
    num_heads: int = 4                     # query heads N
    num_kv_heads: int = 2                  # key/value heads K (GQA when K < N)
    head_dim: int | None = None            # per-head width H; default hidden_size // num_heads
    rope_theta: float = 10000.0            # rotary base
    rope_scaling: RopeScalingConfig | None = None  # LLaMA-3.1 rope scaling; null for none
    rms_norm_eps: float = 1e-6             # epsilon inside RMSNorm
    max_position_embeddings: int = 2048    # longest position the model is meant for
    tie_embeddings: bool = False           # share the input embedding with the output head
    init_std: float = 0.02                 # std of the normal init of every matrix (HF default)
    param_dtype: DType = "float32"         # dtype parameters are stored (and optimised) in
    dtype: DType = "float32"               # dtype of activations and matmuls
    scan_layers: bool = True               # compile one block and scan it (fast compiles at depth)
    remat: Literal["none", "full", "save_dots", "minimal"] = "none"  # activation recompute policy
    init_from: str | None = None           # start from these weights: a local HF LLaMA dir or an import-hf output; null = random init
    attention: Literal["auto", "xla", "chunked", "pallas_flash", "splash", "cudnn"] = "auto"  # attention kernel, all exact for packed rows: auto = the fastest fused kernel the platform and mesh can run (the benchmark's kernel table; default GPU pallas_flash, TPU splash, CPU chunked), xla = jax.nn.dot_product_attention, chunked = causal query blocks, pallas_flash = Pallas Triton GPU kernel, splash = TPU splash kernel, cudnn = cuDNN fused kernel (NVIDIA, bf16/fp16); fused kernels run per device under shard_map on a mesh

    def __post_init__(self):
        if self.hidden_size <= 0 or self.num_layers <= 0 or self.vocab_size <= 0:
            raise ConfigError("model: hidden_size, num_layers and vocab_size must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) is not divisible by "
                              f"model.num_heads ({self.num_heads}); set model.head_dim")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer: a local HF directory, or a byte-level BPE trained on the run's data."""
    path: str | None = None                # local HF tokenizer dir; null trains a BPE into the run dir
    vocab_size: int | None = None          # BPE vocabulary when training one; default model.vocab_size
    min_frequency: int = 2                 # BPE: minimum pair count for a merge
    add_bos: bool = True                   # prepend the BOS token to every example (LLaMA does)


DataFormat = Literal["auto", "alpaca", "seed_tasks", "sharegpt", "openai", "oasst"]


@dataclasses.dataclass(frozen=True)
class DataSourceConfig:
    """One source of a data mixture."""
    path: str = ""                         # JSON/JSONL file (Alpaca or conversations) or a save_to_disk directory
    weight: float = 1.0                    # relative share of each epoch's examples
    format: DataFormat = "auto"            # row layout; auto detects per row

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.mixture: every source needs a path")
        if not self.weight > 0:
            raise ConfigError(f"data.mixture: weight of {self.path} must be positive, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Instruction data and conversations: files or a weighted mixture, chat template, lengths and packing."""
    train_files: tuple[str, ...] = ("builtin:seed_tasks",)  # JSON/JSONL files; builtin:seed_tasks = bundled pool
    format: DataFormat = "auto"            # row layout of train_files; auto detects per row
    template: Literal["alpaca", "vicuna_v1.1", "koala", "tokenizer"] = "alpaca"  # chat template; tokenizer = its chat_template
    max_len: int = 256                     # tokens per example (BOS..EOS) and per packed row
    packing: bool = True                   # pack several examples per row (else one, padded)
    pack_window: int = 64                  # open rows first-fit packing keeps (more = denser)
    train_on_inputs: bool = False          # put the prompt tokens in the loss too (Alpaca-LoRA's default), not only the response
    long_conversations: Literal["truncate", "split"] = "truncate"  # over max_len: keep whole exchanges that fit, or split into several examples
    on_malformed: Literal["skip", "error"] = "skip"  # bad conversations: count and skip, or stop naming file:line
    mixture: tuple[DataSourceConfig, ...] = ()  # weighted sources; when set, replaces train_files
    mixture_size: int | None = None        # examples drawn from the mixture per epoch; null = all sources' total
    eval_files: tuple[str, ...] = ()       # held-out JSON/JSONL files scored during training, never trained on
    eval_fraction: float = 0.0             # fraction of each source's rows held out for eval (chosen by train.seed)

    def __post_init__(self):
        if not self.train_files and not self.mixture:
            raise ConfigError("data.train_files: at least one file is needed")
        if self.mixture_size is not None and self.mixture_size <= 0:
            raise ConfigError(f"data.mixture_size must be positive, got {self.mixture_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_len < 8:
            raise ConfigError(f"data.max_len must be at least 8, got {self.max_len}")
        if self.pack_window < 1:
            raise ConfigError("data.pack_window must be >= 1")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then decay, and global-norm clipping."""
    learning_rate: float = 3e-3            # peak learning rate
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_ratio: float = 0.03             # warmup length as a fraction of total steps
    warmup_steps: int | None = None        # warmup length in steps (overrides warmup_ratio)
    min_lr_ratio: float = 0.0              # final learning rate as a fraction of the peak
    weight_decay: float = 0.0              # decoupled weight decay (not on norms)
    b1: float = 0.9                        # Adam beta1
    b2: float = 0.999                      # Adam beta2 (HF Trainer default, as Alpaca used)
    eps: float = 1e-8                      # Adam epsilon
    max_grad_norm: float | None = 1.0      # clip gradients to this global norm; null for none

    def __post_init__(self):
        if self.learning_rate < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ConfigError("optimizer: learning_rate must be >= 0 and warmup_ratio in [0, 1]")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop length, batch, logging."""
    seed: int = 0                          # seeds init, shuffling and packing
    num_epochs: int = 3                    # passes over the training data
    max_steps: int | None = None           # total optimizer steps; overrides num_epochs (cuts or repeats the data, as HF Trainer)
    batch_size: int = 8                    # global batch in rows (packed rows or padded examples)
    grad_accum: int = 1                    # micro-batches per step; batch_size must divide evenly
    log_every: int = 10                    # steps between metric lines (step 1 always logged)
    eval_every: int | None = None          # steps between held-out evals (and always the last); null = last step only
    progress_bar: bool = True              # show a tqdm bar on stderr
    resume: bool = True                    # continue from the run dir's latest checkpoint; false = refuse a run dir that has one
    allow_config_change: bool = False      # resume even if model/data/optimizer/schedule/batch/seed keys changed since the checkpoint
    chunked_loss: Literal["auto", "always", "never"] = "auto"  # cross-entropy over 1024-token chunks so the [B, T, V] fp32 logits never exist whole; auto = chunk when they would exceed 64 MiB per device

    def __post_init__(self):
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a positive multiple "
                              f"of train.grad_accum ({self.grad_accum})")
        if self.num_epochs <= 0 or self.log_every <= 0:
            raise ConfigError("train.num_epochs and train.log_every must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("train.max_steps must be positive")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ConfigError(f"train.eval_every must be positive or null, got {self.eval_every}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run writes."""
    name: str = "tiny"                     # run name; the run dir defaults to runs/<name>
    dir: str | None = None                 # run directory (overrides runs/<name>)
    tensorboard: bool = True               # also write TensorBoard event files

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-axis rules that place parameters and batches on it."""
    data: int = -1                         # data-parallel axis size; -1 = the remaining devices
    fsdp: int = 1                          # fully-sharded data-parallel axis size
    tensor: int = 1                        # tensor-parallel axis size
    # logical axis -> mesh axis (or list of mesh axes, or null = replicated)
    rules: dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "batch": ["data", "fsdp"], "length": None, "vocab": "tensor", "embed": "fsdp",
        "heads": "tensor", "kv_heads": "tensor", "head_dim": None, "mlp": "tensor",
        "norm": None, "layers": None, "lora_rank": None,
    })


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start-up (`jax.distributed.initialize`). Single-process runs leave it alone."""
    coordinator_address: str | None = None  # host:port of process 0; set to run multi-process
    num_processes: int | None = None        # total processes (with coordinator_address)
    process_id: int | None = None           # this process's index (with coordinator_address)
    auto: bool = False                      # let JAX detect the cluster (SLURM, TPU pods, ...)
    cpu_collectives: Literal["gloo", "mpi", "none"] = "gloo"  # CPU cross-process collectives


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in <run dir>/checkpoints/<step>: params, optimizer state, data position."""
    every: int | None = 100                # save every N optimizer steps (and always at the last); null = only the last
    keep: int | None = 3                   # keep the K most recent checkpoints; null keeps all
    keep_best: bool = False                # also keep the one with the lowest loss: eval loss when there is a held-out set, else train loss
    async_save: bool = True                # write in a background thread while training continues

    def __post_init__(self):
        if self.every is not None and self.every <= 0:
            raise ConfigError(f"checkpoint.every must be positive or null, got {self.every}")
        if self.keep is not None and self.keep <= 0:
            raise ConfigError(f"checkpoint.keep must be positive or null, got {self.keep}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the block matmuls an adapter can sit on


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on a frozen base (LoRA), optionally 8- or 4-bit (QLoRA). No section = full fine-tuning."""
    rank: int = 8                          # r: adapter A is [in, r], B is [r, out]
    alpha: float = 16.0                    # the adapter output is scaled by alpha / rank
    dropout: float = 0.0                   # dropout rate on each adapter's input while training
    target_modules: tuple[str, ...] = ("q", "v")  # block matmuls with adapters: any of q k v o gate up down
    base_dtype: DType | None = None        # dtype the frozen weights are kept in; null = model.param_dtype
    quantize: Literal["none", "int8", "nf4"] = "none"  # the frozen block matmuls: as base_dtype, int8, or 4-bit NormalFloat
    block_size: int = 64                   # weights per quantization scale, along each matrix's last axis
    init_from: str | None = None           # a PEFT LoRA adapter directory to continue training; null = A random, B zero

    def __post_init__(self):
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules:
            raise ConfigError(f"config key 'lora.target_modules': unknown target module "
                              f"'{unknown[0] if unknown else ''}' (known: {', '.join(LORA_TARGETS)})")
        if self.rank <= 0 or self.block_size <= 0:
            raise ConfigError("lora.rank and lora.block_size must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_target_dims(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of the weight each adapter target sits beside."""
    q, kv = model.num_heads * model.resolved_head_dim, model.num_kv_heads * model.resolved_head_dim
    d, f = model.hidden_size, model.intermediate_size
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def _check_lora_fits(model: ModelConfig, lora: LoraConfig) -> None:
    dims = lora_target_dims(model)
    for target in lora.target_modules:
        if lora.rank > min(dims[target]):
            raise ConfigError(f"lora.rank ({lora.rank}) is larger than a dimension of target module "
                              f"'{target}' ({dims[target][0]} x {dims[target][1]})")
    if lora.quantize != "none":
        last_axes = {"head_dim": model.resolved_head_dim, "hidden_size": model.hidden_size,
                     "intermediate_size": model.intermediate_size}
        for name, size in last_axes.items():
            if size % lora.block_size or (lora.quantize == "nf4" and lora.block_size % 2):
                raise ConfigError(f"lora.block_size ({lora.block_size}) must be even and divide "
                                  f"model.{name} ({size}): quantization blocks run along each matrix's last axis")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Preference tuning (DPO and kin) on chosen/rejected pairs. No section = supervised fine-tuning."""
    beta: float = 0.1                      # strength of the pull towards the reference (DPO's beta; IPO's tau)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # sigmoid = DPO, ipo = IPO (per-token log-ratios), hinge = SLiC
    label_smoothing: float = 0.0           # sigmoid only: probability a pair's label is flipped (conservative DPO), in [0, 0.5)
    reference: str | None = None           # the reference model: null = the starting weights, frozen (LoRA: the base with adapters off); or a HF dir, import-hf output or run dir
    precompute_reference: bool = False     # score every pair with the reference once before training, so it is not held in memory during training

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"preference.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"preference.label_smoothing applies to loss=sigmoid only, not {self.loss}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    lora: LoraConfig | None = None         # adapters on a frozen base; null = full fine-tuning
    preference: PreferenceConfig | None = None  # train on chosen/rejected pairs (DPO); null = supervised fine-tuning

    def __post_init__(self):
        if self.lora is not None:
            _check_lora_fits(self.model, self.lora)
        if self.preference is not None and self.data.mixture:
            raise ConfigError("preference: data.mixture is not supported; list the pair files in data.train_files")


def _resolve_model_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Put the named preset's fields under the model fields the config sets itself."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return data
    name = model["preset"]
    path = MODEL_PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"config key 'model.preset': unknown preset '{name}' (known: {known})")
    preset = configlib.load_yaml(path)
    return {**data, "model": {**preset, **model}}


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = configlib.apply_overrides(data, list(overrides))
    return configlib.build(Config, _resolve_model_preset(data))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file + `section.field=value` overrides. With no file, the embedded default run:
    `configs/tiny.yaml`, shipped inside the package (the tiny LLaMA on the bundled seed tasks)."""
    data = configlib.load_yaml(path if path is not None else DEFAULT_CONFIG)
    return config_from_dict(data, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    configlib.dump_yaml(cfg, path)
