"""The job config: one YAML file -> one `JobConfig`, validated before anything is submitted.

Sections: `cluster`, `groups` (inference, training), `model`, `stage` + the stage's own section
(`sft`, `dpo` or `rlvr`), `data`, `checkpoint`, `monitoring`, `run`. `mode` says what the job
does with the layout: `train` (the stage), `rehearse` (form every group, run one collective in
each, write a membership report) or `counter` (a tiny resumable loop used to test requeue).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from monitoring.config import MonitorConfig

from tulu.config.schema import ConfigError, from_dict, require, to_dict

__all__ = ["JobConfig", "ConfigError", "load_config", "parse_config", "apply_overrides"]


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    executor: Literal["slurm", "local"] = "slurm"
    nodes: int = 1
    # Spare nodes allocated with the job (issue 16): the training step runs on `nodes` of them;
    # on a hang or crash the monitor replaces the culprit's node by a spare and restarts the
    # step inside the allocation (no requeue, no queue wait). Slurm executor only.
    spare_nodes: int = 0
    gpus_per_node: int = 8  # one Slurm task per GPU; on CPU clusters: tasks per node
    gpu_memory_gb: float = 80.0
    # Host RAM of one node, GB: `tulu plan` refuses a layout whose fullest node needs more (a
    # checkpoint save gathers each shard's optimizer state in host RAM). 1000 is a cautious
    # default for an 8-GPU server; a DGX H100 has 2 TB (set 2000).
    host_memory_gb: float = 1000.0
    request_gpus: bool = True  # ask Slurm for --gpus-per-node (fake GPUs on the local cluster)
    cpus_per_task: int = 1
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_limit_min: int = 60
    exclusive: bool = False
    signal_delay_s: int = 90  # warning before the time limit (submitit sends USR2)
    env: dict[str, str] = field(default_factory=dict)  # extra exports for every task

    def validate(self) -> None:
        require(self.nodes >= 1, "cluster.nodes", self.nodes, "an integer >= 1")
        require(isinstance(self.spare_nodes, int) and self.spare_nodes >= 0, "cluster.spare_nodes",
                self.spare_nodes, "an integer >= 0 (nodes allocated beside cluster.nodes for in-job restarts)")
        require(self.gpus_per_node >= 1, "cluster.gpus_per_node", self.gpus_per_node, "an integer >= 1")
        require(self.gpu_memory_gb > 0, "cluster.gpu_memory_gb", self.gpu_memory_gb, "a number > 0")
        require(self.host_memory_gb > 0, "cluster.host_memory_gb", self.host_memory_gb, "a number > 0 (GB per node)")
        require(self.mem_gb is None or self.mem_gb > 0, "cluster.mem_gb", self.mem_gb, "a number > 0 or null")
        require(self.cpus_per_task >= 1, "cluster.cpus_per_task", self.cpus_per_task, "an integer >= 1")
        require(self.time_limit_min >= 1, "cluster.time_limit_min", self.time_limit_min, "minutes >= 1")
        require(
            0 <= self.signal_delay_s < self.time_limit_min * 60,
            "cluster.signal_delay_s",
            self.signal_delay_s,
            f"seconds in [0, {self.time_limit_min * 60}) (below the time limit)",
        )
        if self.executor == "local":
            require(self.nodes == 1, "cluster.nodes", self.nodes, "1 with cluster.executor 'local'")
            require(self.spare_nodes == 0, "cluster.spare_nodes", self.spare_nodes,
                    "0 with cluster.executor 'local' (spares replace Slurm nodes; set cluster.executor: slurm)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(kw_only=True, slots=True)
class InferenceGroupConfig:
    gpus: int = 0
    engine: Literal["vllm", "transformers"] = "vllm"
    tp: int = 1
    pp: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 4096

    def validate(self) -> None:
        require(self.gpus >= 0, "groups.inference.gpus", self.gpus, "an integer >= 0")
        require(self.tp >= 1, "groups.inference.tp", self.tp, "an integer >= 1")
        require(self.pp >= 1, "groups.inference.pp", self.pp, "an integer >= 1")
        require(
            0 < self.gpu_memory_utilization <= 1,
            "groups.inference.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "a fraction in (0, 1]",
        )
        require(self.max_model_len >= 16, "groups.inference.max_model_len", self.max_model_len, ">= 16")
        if self.engine == "transformers":
            require(self.tp == 1 and self.pp == 1, "groups.inference.tp", self.tp,
                    "1 (with pp 1) for engine 'transformers', which runs one GPU per engine; use engine 'vllm'")


@dataclass(kw_only=True, slots=True)
class TrainingGroupConfig:
    tp: int = 1
    pp: int = 1
    dp: int | Literal["auto"] = "auto"
    distributed_optimizer: bool = True
    grad_dtype: Literal["bf16", "fp32"] = "fp32"
    recompute: Literal["none", "selective", "full"] = "none"
    sequence_parallel: bool = False
    micro_batch_size: int = 1

    def validate(self) -> None:
        require(self.tp >= 1, "groups.training.tp", self.tp, "an integer >= 1")
        require(self.pp >= 1, "groups.training.pp", self.pp, "an integer >= 1")
        if self.dp != "auto":
            require(self.dp >= 1, "groups.training.dp", self.dp, "an integer >= 1 or 'auto'")
        require(self.micro_batch_size >= 1, "groups.training.micro_batch_size", self.micro_batch_size, ">= 1")


@dataclass(kw_only=True, slots=True)
class GroupsConfig:
    inference: InferenceGroupConfig = field(default_factory=InferenceGroupConfig)
    training: TrainingGroupConfig = field(default_factory=TrainingGroupConfig)


@dataclass(kw_only=True, slots=True)
class TinyArch:
    """A Llama-shaped model built from scratch: no download, for CPU runs and tests."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0

    def validate(self, key: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"{key}.hidden_size",
            self.hidden_size,
            f"a multiple of num_attention_heads ({self.num_attention_heads})",
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"{key}.num_key_value_heads",
            self.num_key_value_heads,
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
        )


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    # Exactly one of: a HF name/path (weights loaded), a named architecture (shape only, e.g.
    # for planning), or a tiny architecture built from scratch.
    name_or_path: str | None = None
    arch: str | None = None
    tiny: TinyArch | None = None
    dtype: Literal["bf16", "fp32"] = "bf16"
    tokenizer: str | None = None
    value_model: str | None = None  # PPO value model: a named architecture or HF path; default: same as policy
    # Weights from an earlier stage's tulu checkpoint (a run's checkpoints/ or one step_N); the
    # architecture above must match it. Lets a pipeline submit DPO before SFT has written anything.
    init_from: str | None = None

    def validate(self) -> None:
        given = [k for k in ("name_or_path", "arch", "tiny") if getattr(self, k) is not None]
        require(len(given) == 1, "model", given or "nothing", "exactly one of model.name_or_path, model.arch, model.tiny")
        if self.arch is not None:
            from tulu.config.shapes import ARCHITECTURES

            require(self.arch in ARCHITECTURES, "model.arch", self.arch, ", ".join(sorted(ARCHITECTURES)))
        if self.value_model is not None:
            from tulu.config.shapes import ARCHITECTURES

            require(
                self.value_model in ARCHITECTURES or "/" in self.value_model,
                "model.value_model",
                self.value_model,
                "a HF name/path or one of " + ", ".join(sorted(ARCHITECTURES)),
            )
        if self.tiny is not None:
            self.tiny.validate("model.tiny")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8

    def validate(self, key: str) -> None:
        require(self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        require(0 <= self.min_lr <= self.lr, f"{key}.min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        require(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        require(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, ">= 0")
        require(self.grad_clip >= 0, f"{key}.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 2
    max_steps: int | None = None  # when set, the run's length in optimizer steps; epochs is then unused
    global_batch_size: int = 128
    max_seq_len: int = 4096
    packing: bool = True
    log_interval: int = 1
    eval_interval: int = 0

    def validate(self, key: str = "sft") -> None:
        self.optim.validate(f"{key}.optim")
        require(self.epochs >= 1, f"{key}.epochs", self.epochs, ">= 1")
        require(self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps", self.max_steps, ">= 1 or null")
        require(self.global_batch_size >= 1, f"{key}.global_batch_size", self.global_batch_size, ">= 1")
        require(self.max_seq_len >= 8, f"{key}.max_seq_len", self.max_seq_len, ">= 8")
        require(self.log_interval >= 1, f"{key}.log_interval", self.log_interval, ">= 1")


@dataclass(kw_only=True, slots=True)
class DPOConfig(SFTConfig):
    beta: float = 5.0
    loss: Literal["dpo_norm", "dpo"] = "dpo_norm"  # Tulu 3: length-normalised DPO
    reference_logprobs: Literal["frozen_model", "precomputed"] = "frozen_model"
    # + nll_coef x the chosen response's mean token NLL (RPO, Pang et al. 2024; TRL's rpo_alpha):
    # DPO alone can lower the chosen answer's likelihood along with the rejected one's
    nll_coef: float = 0.0

    def validate(self, key: str = "dpo") -> None:
        SFTConfig.validate(self, key)
        require(self.beta > 0, f"{key}.beta", self.beta, "a number > 0")
        require(self.nll_coef >= 0, f"{key}.nll_coef", self.nll_coef, "a number >= 0 (0: plain DPO)")


@dataclass(kw_only=True, slots=True)
class RLVRConfig:
    algorithm: Literal["ppo", "grpo"] = "grpo"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.0))
    steps: int = 100
    prompts_per_step: int = 64
    samples_per_prompt: int = 4
    response_length: int = 1024
    temperature: float = 1.0
    kl_beta: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    clip_eps: float = 0.2
    ppo_epochs: int = 1
    gamma: float = 1.0
    gae_lambda: float = 0.95
    value_loss_coef: float = 0.5
    value_lr: float | None = None
    verified_reward: float = 10.0
    unverified_reward: float = 0.0
    no_eos_penalty: float = 0.0
    verifier_timeout_s: float = 10.0
    verifier_workers: int = 2
    weight_sync_bucket_mb: float = 256.0
    # Training stages an engine rank receives at once (each through its own head GPU on the
    # engine's node, so its own NIC); each holds two or three receive buffers of a bucket's size.
    weight_sync_streams: int = 8
    # Rollouts generated ahead of training: 0 = synchronous (step s's rollouts come from the
    # weights step s trains); k = the inference group generates step s's rollouts with the
    # weights after step s - k while the learner trains the steps in between (off-policy by k).
    async_steps: int = 0
    # GRPO's training passes with each prompt once per group: "auto" when it costs fewer FLOPs
    # than one row per sample (tulu.rlvr.batch.shared_prompt_micro_batches), "always", or "never"
    prompt_sharing: Literal["auto", "always", "never"] = "auto"
    # Who computes the KL reference's log-probs: the training group (a frozen Megatron copy, a
    # forward pass per step) or the inference group (the transformers engine keeps a frozen
    # copy and scores its own completions; the learner's step loses the reference pass)
    reference_logprobs: Literal["training", "inference"] = "training"
    # Where the verifiers run: "learner" (its leader scores every rollout it collects) or "engine"
    # (each engine's reporting rank scores its own completions beside its reference pass and sends
    # the results with them; verifier_workers per engine): the learner's step then does not wait
    # for them and several engines share the scoring, for hosts whose engine CPUs idle (GPU
    # engines). On a 2-core CPU box it ran ~3% slower: the workers then compete with training.
    # tulu.rlvr.scoring
    score_on: Literal["learner", "engine"] = "learner"

    @property
    def reference_in_engine(self) -> bool:
        """The engines score the reference (there is one: kl_beta > 0) and the learner does not."""
        return self.reference_logprobs == "inference" and self.kl_beta > 0

    def validate(self, key: str = "rlvr") -> None:
        self.optim.validate(f"{key}.optim")
        require(self.steps >= 1, f"{key}.steps", self.steps, ">= 1")
        require(self.prompts_per_step >= 1, f"{key}.prompts_per_step", self.prompts_per_step, ">= 1")
        min_samples = 2 if self.algorithm == "grpo" else 1
        require(
            self.samples_per_prompt >= min_samples,
            f"{key}.samples_per_prompt",
            self.samples_per_prompt,
            f">= {min_samples} for {self.algorithm} (GRPO normalises within a group)",
        )
        require(self.response_length >= 1, f"{key}.response_length", self.response_length, ">= 1")
        require(self.temperature > 0, f"{key}.temperature", self.temperature, "> 0")
        require(self.kl_beta >= 0, f"{key}.kl_beta", self.kl_beta, ">= 0")
        require(0 < self.clip_eps < 1, f"{key}.clip_eps", self.clip_eps, "in (0, 1)")
        require(0 <= self.gamma <= 1, f"{key}.gamma", self.gamma, "in [0, 1]")
        require(0 <= self.gae_lambda <= 1, f"{key}.gae_lambda", self.gae_lambda, "in [0, 1]")
        require(self.verifier_timeout_s > 0, f"{key}.verifier_timeout_s", self.verifier_timeout_s, "> 0")
        require(self.verifier_workers >= 1, f"{key}.verifier_workers", self.verifier_workers, ">= 1")
        require(self.weight_sync_bucket_mb > 0, f"{key}.weight_sync_bucket_mb", self.weight_sync_bucket_mb, "> 0")
        require(isinstance(self.weight_sync_streams, int) and not isinstance(self.weight_sync_streams, bool)
                and self.weight_sync_streams >= 1, f"{key}.weight_sync_streams", self.weight_sync_streams,
                "an integer >= 1 (training stages an engine rank receives at once)")
        require(isinstance(self.async_steps, int) and not isinstance(self.async_steps, bool) and self.async_steps >= 0,
                f"{key}.async_steps", self.async_steps,
                "an integer >= 0 (0: synchronous; 1: one-step off-policy generation overlapping training)")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train: str | None = None  # local jsonl/parquet path or hub dataset name
    eval: str | None = None
    split: str = "train"
    synthetic: Literal["arithmetic_sft", "arithmetic_preference", "arithmetic_rlvr"] | None = None
    synthetic_size: int = 512
    shuffle_seed: int = 1234
    cache_dir: str | None = None


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    dir: str | None = None  # default: <run.dir>/checkpoints
    interval: int = 100  # steps
    keep_last: int = 3
    load: bool = True
    # `tulu submit` refuses a run folder whose file system cannot hold keep_last + 1 checkpoints
    # (plus logs); false submits anyway (the trainer still refuses a save that does not fit)
    check_free_space: bool = True

    def validate(self) -> None:
        require(self.interval >= 1, "checkpoint.interval", self.interval, "steps >= 1")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, ">= 1")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "tulu"
    dir: str = "runs/{name}"  # `{name}` is replaced; relative paths are relative to the cwd at submit time
    seed: int = 1234
    counter_steps: int = 20  # mode=counter: steps of the resumable test loop
    counter_step_s: float = 0.5
    counter_checkpoint_interval: int = 1

    def validate(self) -> None:
        require(is_plain_name(self.name), "run.name", self.name,
                "one plain folder name (no '/', not '.' or '..', not empty)")
        try:
            self.dir.format(name=self.name)
        except (KeyError, IndexError, ValueError):
            raise ConfigError("run.dir", f"got {self.dir!r}; allowed: a path where only {{name}} is replaced, "
                                         "e.g. runs/{name}") from None


def is_plain_name(name: str) -> bool:
    """One path component that stays where `{name}` puts it: no separator, not `.` or `..`."""
    return (bool(name) and name == name.strip() and name not in (".", "..")
            and "/" not in name and "\\" not in name and name.isprintable())


@dataclass(kw_only=True, slots=True)
class JobConfig:
    mode: Literal["train", "rehearse", "counter"] = "train"
    stage: Literal["sft", "dpo", "rlvr"] = "sft"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(tiny=TinyArch()))
    sft: SFTConfig | None = None
    dpo: DPOConfig | None = None
    rlvr: RLVRConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitoring: MonitorConfig = field(default_factory=MonitorConfig)  # the monitor's own config
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "JobConfig":
        self.cluster.validate()
        self.groups.inference.validate()
        self.groups.training.validate()
        self.model.validate()
        for other in ("sft", "dpo", "rlvr"):
            if other != self.stage and getattr(self, other) is not None:
                raise ConfigError(other, f"section given but stage is {self.stage!r}; remove it or set stage: {other}")
        if getattr(self, self.stage) is None:
            setattr(self, self.stage, {"sft": SFTConfig, "dpo": DPOConfig, "rlvr": RLVRConfig}[self.stage]())
        self.stage_config.validate()
        if self.stage == "rlvr" and self.mode == "train":
            require(self.groups.inference.gpus >= 1, "groups.inference.gpus", self.groups.inference.gpus,
                    ">= 1 for stage rlvr (someone has to generate)")
            rl = self.rlvr
            if rl.algorithm == "ppo" and self.model.value_model is not None:
                from tulu.config.shapes import ARCHITECTURES

                require(self.model.value_model not in ARCHITECTURES, "model.value_model", self.model.value_model,
                        "a HF name/path or a tulu checkpoint folder holding the value model's initial weights "
                        f"(a shape name such as {self.model.value_model!r} has no weights; it serves "
                        "model.arch for `tulu plan` only), or unset to start from the policy's weights")
            require(rl.reference_logprobs == "training" or (self.groups.inference.engine == "transformers"
                                                            and rl.algorithm == "grpo"),
                    "rlvr.reference_logprobs", rl.reference_logprobs,
                    "'training', or 'inference' with groups.inference.engine: transformers and rlvr.algorithm: grpo "
                    f"(got engine {self.groups.inference.engine!r}, algorithm {rl.algorithm!r})")
        if self.stage != "rlvr":
            require(self.groups.inference.gpus == 0 or self.mode != "train", "groups.inference.gpus",
                    self.groups.inference.gpus, f"0 for stage {self.stage} (only rlvr uses an inference group)")
        require(self.cluster.spare_nodes == 0 or self.monitoring.enabled, "cluster.spare_nodes",
                self.cluster.spare_nodes, "0 with monitoring.enabled: false (the monitor is what restarts "
                "the job on a spare node)")
        self.checkpoint.validate()
        self.run.validate()
        return self

    @property
    def stage_config(self) -> SFTConfig | DPOConfig | RLVRConfig:
        return getattr(self, self.stage)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir.format(name=self.run.name)).expanduser()

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir).expanduser() if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict:
        return to_dict(self)

    def fingerprint(self, keys: tuple[str, ...] = ("stage", "model")) -> str:
        """Hash of the parts a checkpoint must agree with (parallel layout may change)."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Path values: a leading `~` means the home folder here as in a shell.
PATH_KEYS = ("run.dir", "checkpoint.dir", "data.train", "data.eval", "data.cache_dir", "model.name_or_path",
             "model.tokenizer", "model.init_from")


MOVED_KEYS = {"cluster.max_restarts": "monitoring.max_restarts"}
"""Keys an older config may still use, and where they live now."""


def parse_config(data: dict) -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError("", f"the config must be a YAML mapping, got {type(data).__name__}")
    for old, new in MOVED_KEYS.items():
        section, name = old.split(".")
        if isinstance(data.get(section), dict) and name in data[section]:
            raise ConfigError(old, f"this key moved: set {new} instead (same meaning)")
    cfg = from_dict(JobConfig, data)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(getattr(cfg, section), name, os.path.expanduser(value))
    return cfg.validate()


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` and `1e-08` (no dot) as strings; users (and json.dumps) mean numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def yaml_load(text: str, source: str = "<value>"):
    """Parse YAML text; a mapping key written twice is refused with both line numbers."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is not None:
            _refuse_duplicate_keys(node, source)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{source} is not valid YAML: {problem}{where}") from None


def _refuse_duplicate_keys(node: yaml.Node, source: str, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{prefix}.{key}" if prefix else str(key)
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":
                if key in seen:
                    raise ConfigError(dotted, f"written twice in {source} (lines {seen[key]} and {line}); "
                                              "keep one")
                seen[key] = line
            _refuse_duplicate_keys(value_node, source, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{prefix}[{i}]")


def merge_mappings(base: dict, over: dict) -> dict:
    """`over` laid on `base`: nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_mappings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`groups.training.tp=2` style overrides (values parsed as YAML) on a raw config mapping. A
    mapping value (`sft.optim={lr: 1e-5}`) merges into the section like a YAML override does."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like dotted.key=value")
        key, text = item.split("=", 1)
        parts = [p.strip() for p in key.split(".")]
        if not all(parts):
            raise ConfigError(key or item, "an override needs a key: dotted.key=value, e.g. groups.training.tp=2")
        key = ".".join(parts)
        value = yaml_load(text, f"--set {key}")
        node = data
        for depth, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[:depth + 1]), f"is not a section (it is {node!r}); cannot set {key}")
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = merge_mappings(node[last], value)
        else:
            node[last] = value
    return data


def load_raw(path: str | Path) -> dict:
    """The YAML mapping of a config file; an unreadable, empty, non-UTF-8 or duplicate-key file is
    refused with the path (and the key and lines)."""
    path = Path(path).expanduser()
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ConfigError("", f"cannot read config {path}: {e.strerror}") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path} is not a YAML text file (not UTF-8: byte 0x{blob[e.start]:02x} "
                              f"at offset {e.start})") from None
    data = yaml_load(text, str(path))
    if data is None:
        raise ConfigError("", f"{path} is empty (no settings); start from one in configs/, "
                              "e.g. configs/tiny-cpu-sft.yaml")
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must be a YAML mapping of settings, got a {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    data = load_raw(path)
    if overrides:
        data = apply_overrides(data, overrides)
    if data.get("run") is None:
        data["run"] = {}
    if isinstance(data["run"], dict):
        data["run"].setdefault("name", Path(path).stem)
    return parse_config(data)


def config_from_dict(data: dict) -> JobConfig:
    return parse_config(copy.deepcopy(data))
