"""A pipeline config: one YAML file -> the stage jobs' `JobConfig`s, all validated before anything
is submitted.

    pipeline:  name, dir, seed, executor, the task data, on-policy DPO pairs, evaluation
    defaults:  JobConfig keys every stage shares (cluster, model, monitoring, checkpoint, ...)
    stages:    sft / dpo / rlvr: JobConfig keys of that stage, laid over `defaults`

Each stage starts from the previous stage's committed checkpoint (`model.init_from`), so the
whole chain can be submitted at once with Slurm dependencies. An error names the YAML path,
e.g. `stages.dpo.dpo.beta: got -1; allowed: a number > 0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tulu.config.job import JobConfig, apply_overrides, is_plain_name, load_raw, merge_mappings, parse_config
from tulu.config.schema import ConfigError, from_dict, require

STAGE_ORDER = ("sft", "dpo", "rlvr")
UNTRAINED = "untrained"
EVAL_ORDER = (UNTRAINED, *STAGE_ORDER)
"""The evaluation's rows: with an SFT stage, a randomly initialised model of its shape comes first."""
PIPELINE_KEYS = ("pipeline", "defaults", "stages")  # a pipeline config's top level


@dataclass(kw_only=True, slots=True)
class TasksConfig:
    names: list[str] = field(default_factory=lambda: ["gsm8k", "math", "ifeval"])
    sft_per_task: int = 2000
    train_per_task: int = 1000  # RLVR prompts (DPO pairs are sampled from the same pool)
    # held-out prompts: one count for every task, or one per task (`{gsm8k: 300, ifeval: 300, math: 114}`)
    heldout_per_task: int | dict[str, int] = 100
    # task difficulty: GSM8K-style addends 2..N (minuends up to 1.5N), MATH-style denominators 2..N
    gsm8k_max_operand: int = 20
    gsm8k_steps: int = 1  # operations chained in one word problem: 1 or 2
    math_max_denominator: int = 12
    # the share of SFT answers from a careless teacher, which the verifiers reject (tulu.data.sft_rows)
    sft_slip: float = 0.0

    def validate(self) -> None:
        from tulu.data.tasks import TASKS, gsm8k, math_fractions

        require(bool(self.names), "pipeline.tasks.names", self.names, f"a non-empty list of {', '.join(TASKS)}")
        for name in self.names:
            require(name in TASKS, "pipeline.tasks.names", name, ", ".join(TASKS))
        for key in ("sft_per_task", "train_per_task"):
            require(getattr(self, key) >= 1, f"pipeline.tasks.{key}", getattr(self, key), "an integer >= 1")
        if isinstance(self.heldout_per_task, dict):
            for name in self.heldout_per_task:  # a task not in names is unused, a misspelt one refused
                require(name in TASKS, f"pipeline.tasks.heldout_per_task.{name}", name, ", ".join(TASKS))
            for name in self.names:
                require(name in self.heldout_per_task, "pipeline.tasks.heldout_per_task", self.heldout_per_task,
                        f"a count for every task of pipeline.tasks.names ({name} has none), or one count for all")
        for name, n in self.heldout_counts().items():
            key = "pipeline.tasks.heldout_per_task" + (f".{name}" if isinstance(self.heldout_per_task, dict) else "")
            require(n >= 1, key, n, "an integer >= 1")
        require(gsm8k.MIN_MAX_OPERAND <= self.gsm8k_max_operand <= gsm8k.MAX_MAX_OPERAND,
                "pipeline.tasks.gsm8k_max_operand", self.gsm8k_max_operand,
                f"an integer {gsm8k.MIN_MAX_OPERAND}..{gsm8k.MAX_MAX_OPERAND}")
        require(self.gsm8k_steps in gsm8k.STEPS, "pipeline.tasks.gsm8k_steps", self.gsm8k_steps,
                " or ".join(map(str, gsm8k.STEPS)))
        require(math_fractions.MIN_MAX_DENOMINATOR <= self.math_max_denominator <= math_fractions.MAX_MAX_DENOMINATOR,
                "pipeline.tasks.math_max_denominator", self.math_max_denominator,
                f"an integer {math_fractions.MIN_MAX_DENOMINATOR}..{math_fractions.MAX_MAX_DENOMINATOR}")
        require(0.0 <= self.sft_slip < 1.0, "pipeline.tasks.sft_slip", self.sft_slip,
                "a probability 0 <= p < 1 (the share of careless SFT answers)")

    def heldout_counts(self) -> dict[str, int]:
        """Held-out prompts per task."""
        n = self.heldout_per_task
        return {name: n[name] for name in self.names} if isinstance(n, dict) else {name: n for name in self.names}

    def difficulty(self) -> dict[str, dict[str, int]]:
        """The task generators' keywords (`tulu.data.tasks.problems(difficulty=...)`)."""
        gsm8k = {"max_operand": self.gsm8k_max_operand}
        if self.gsm8k_steps != 1:  # data written before the key existed keeps its card
            gsm8k["steps"] = self.gsm8k_steps
        return {"gsm8k": gsm8k, "math": {"max_denominator": self.math_max_denominator}}


@dataclass(kw_only=True, slots=True)
class PairsConfig:
    """On-policy preference pairs as Tülu 3 made them: sample the SFT model, label by verifier."""

    prompts_per_task: int = 300
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    engine: Literal["transformers", "vllm"] = "transformers"
    reference_chosen: bool = True  # no verified sample: the task's reference answer is "chosen"

    def validate(self) -> None:
        require(self.prompts_per_task >= 1, "pipeline.pairs.prompts_per_task", self.prompts_per_task, ">= 1")
        require(self.samples_per_prompt >= 2, "pipeline.pairs.samples_per_prompt", self.samples_per_prompt,
                ">= 2 (a pair needs two samples)")
        require(self.temperature > 0, "pipeline.pairs.temperature", self.temperature, "> 0")
        require(self.max_new_tokens >= 1, "pipeline.pairs.max_new_tokens", self.max_new_tokens, ">= 1")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    max_new_tokens: int = 48
    engine: Literal["transformers", "vllm"] = "transformers"

    def validate(self) -> None:
        require(self.max_new_tokens >= 1, "pipeline.eval.max_new_tokens", self.max_new_tokens, ">= 1")


@dataclass(kw_only=True, slots=True)
class PipelineSettings:
    name: str = "pipeline"
    dir: str = "runs/{name}"
    seed: int = 1
    # auto: the local Slurm when `sinfo` answers, else submitit's local executor (stages in turn).
    executor: Literal["auto", "slurm", "local"] = "auto"
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    tasks: TasksConfig = field(default_factory=TasksConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage_time_limit_min: int = 30  # the pairs and evaluation jobs

    def validate(self) -> None:
        require(is_plain_name(self.name), "pipeline.name", self.name,
                "one plain folder name (no '/', not '.' or '..', not empty), e.g. tiny-cpu-seed2")
        self._check_folder()
        require(bool(self.stages) and all(s in STAGE_ORDER for s in self.stages), "pipeline.stages", self.stages,
                f"a non-empty list of {', '.join(STAGE_ORDER)}")
        require(self.stages == [s for s in STAGE_ORDER if s in self.stages], "pipeline.stages", self.stages,
                "stages in Tülu 3's order: sft, dpo, rlvr")
        require(self.stages[0] == "sft", "pipeline.stages", self.stages, "a list starting with sft")
        self.tasks.validate()
        self.pairs.validate()
        self.eval.validate()

    def root(self) -> Path:
        """The pipeline's folder: `dir` with `{name}` and a leading `~` replaced, absolute."""
        try:
            return Path(self.dir.format(name=self.name)).expanduser().resolve()
        except (KeyError, IndexError, ValueError):
            raise ConfigError("pipeline.dir", f"got {self.dir!r}; allowed: a path where only {{name}} is "
                                              "replaced, e.g. runs/{name}") from None

    def _check_folder(self) -> None:
        """Never a folder that is or holds `/`, the home or working folder or a repository:
        `--fresh` empties it."""
        from tulu.deletion import refusal

        root = self.root()
        reason = refusal(root)
        if reason:
            raise ConfigError("pipeline.dir", f"got {self.dir!r}, which is {root}: {reason}; allowed: a folder "
                                              "of the pipeline's own, e.g. runs/{name}")


@dataclass
class Pipeline:
    settings: PipelineSettings
    jobs: dict[str, JobConfig]  # stage -> its job, in order
    source: str | None = None

    @property
    def dir(self) -> Path:
        return self.settings.root()

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage


def stage_job_data(settings: PipelineSettings, defaults: dict, stage_data: dict, stage: str, root: Path) -> dict:
    """The raw JobConfig mapping of one stage: defaults, the stage's keys, then what the chain fixes."""
    data = merge_mappings(defaults, stage_data)
    data["stage"] = stage
    run = data.setdefault("run", {})
    run.update(name=f"{settings.name}-{stage}", dir=str(root / stage), seed=settings.seed)
    data_sec = data.setdefault("data", {})
    data_sec.setdefault("shuffle_seed", settings.seed)
    files = root / "data"
    data_sec.update({"sft": {"train": str(files / "sft.jsonl")},
                     "dpo": {"train": str(files / "dpo_pairs.jsonl")},
                     "rlvr": {"train": str(files / "rlvr_train.jsonl"), "eval": str(files / "heldout.jsonl")}}[stage])
    data_sec["synthetic"] = None
    previous = [s for s in STAGE_ORDER if s in settings.stages and STAGE_ORDER.index(s) < STAGE_ORDER.index(stage)]
    if previous:
        data.setdefault("model", {})["init_from"] = str(root / previous[-1] / "checkpoints")
    return data


def parse_pipeline(raw: dict, source: str | None = None) -> Pipeline:
    if not isinstance(raw, dict):
        raise ConfigError("", "a pipeline config must be a YAML mapping")
    unknown = sorted(set(raw) - {"pipeline", "defaults", "stages"})
    if unknown:
        raise ConfigError(unknown[0], "unknown key; valid top-level keys of a pipeline config: pipeline, defaults, stages")
    for key in PIPELINE_KEYS:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(key, f"got {raw[key]!r}; expected a mapping")
    settings = from_dict(PipelineSettings, raw.get("pipeline") or {}, "pipeline")
    settings.validate()
    stages_raw = raw.get("stages") or {}
    extra = sorted(set(stages_raw) - set(STAGE_ORDER))  # a section of a skipped stage is kept, unused
    if extra:
        raise ConfigError(f"stages.{extra[0]}", f"unknown stage; allowed: {', '.join(STAGE_ORDER)}")
    root = settings.root()
    jobs = {}
    for stage in settings.stages:
        if not isinstance(stages_raw.get(stage) or {}, dict):
            raise ConfigError(f"stages.{stage}", f"got {stages_raw[stage]!r}; expected a mapping of job config keys")
        data = stage_job_data(settings, raw.get("defaults") or {}, stages_raw.get(stage) or {}, stage, root)
        try:
            jobs[stage] = parse_config(data)
        except ConfigError as e:
            raise ConfigError(f"stages.{stage}.{e.key}" if e.key else f"stages.{stage}",
                              str(e).split(": ", 1)[-1] if e.key else str(e)) from None
    return Pipeline(settings, jobs, source)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load and validate; overrides are dotted like the YAML (`stages.rlvr.rlvr.steps=10`)."""
    raw = load_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    if raw.get("pipeline") is None:
        raw["pipeline"] = {}
    if isinstance(raw["pipeline"], dict):
        raw["pipeline"].setdefault("name", Path(path).stem)
    return parse_pipeline(raw, str(path))


def config_kind(raw: dict) -> str:
    """'pipeline' for a pipeline config (pipeline/defaults/stages), else 'job' (one stage)."""
    return "pipeline" if any(k in raw for k in PIPELINE_KEYS) else "job"


def is_pipeline_config(path: str | Path) -> bool:
    return config_kind(load_raw(path)) == "pipeline"
