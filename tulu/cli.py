"""`tulu`: plan, submit, rehearse, pipeline, logs, status, cancel, score, export.

Every subcommand is an argparse subparser (`tulu CMD --help`). A failure the user can fix (a
config value, a path, a job that does not exist, a Slurm command that does not answer) is one line
on stderr, `tulu: <what>: <where>`, and exit status 2; `TULU_DEBUG=1` adds the traceback. Paths
are checked before the heavy imports (torch, Megatron).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback

from tulu.config.job import ConfigError, load_config, load_raw
from tulu.errors import CommandError

JOB_EXAMPLE = "configs/tiny-cpu-sft.yaml"
PIPELINE_EXAMPLE = "configs/tiny-cpu.yaml"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tulu-hpc")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _kind(path: str) -> str:
    from tulu.pipeline.config import config_kind

    return config_kind(load_raw(path))


def _require_job_config(path: str) -> None:
    if _kind(path) == "pipeline":
        raise CommandError("a pipeline config, not a job config", path,
                           f"run it with: tulu pipeline {path} (a job config looks like {JOB_EXAMPLE})")


def _load(args) -> "JobConfig":  # noqa: F821
    overrides = list(args.set or [])
    if getattr(args, "mode", None):
        overrides.append(f"mode={args.mode}")
    return load_config(args.config, overrides)


def _print_pipeline_plan(pipeline) -> None:
    from tulu.pipeline.driver import plan_stages

    for stage, plan in plan_stages(pipeline).items():
        print(f"# stage {stage}: {pipeline.jobs[stage].run_dir}")
        print(plan.describe())


def cmd_plan(args) -> int:
    if _kind(args.config) == "pipeline":
        from tulu.pipeline.config import load_pipeline

        print(f"# {args.config} is a pipeline config: the plan of each stage (run it with: tulu pipeline "
              f"{args.config})")
        _print_pipeline_plan(load_pipeline(args.config, list(args.set or [])))
        return 0
    from tulu.plan.layout import build_plan, spares_line
    from tulu.plan.run_space import run_folder_space

    from tulu.dist.sync_model import sync_plan_lines
    from tulu.modes import prepare

    cfg = _load(args)
    plan = build_plan(cfg)
    print(plan.describe())
    spares = spares_line(cfg.cluster)
    if spares:
        print(spares)
    space = run_folder_space(cfg, plan)
    if space is not None:
        print(space.describe())
    data = prepare.describe(cfg)
    if data:
        print(data)
    for line in sync_plan_lines(cfg, plan):
        print(line)
    return 0


def cmd_submit(args) -> int:
    _require_job_config(args.config)
    from tulu.launch import executor
    from tulu.modes import prepare
    from tulu.plan.layout import build_plan
    from tulu.plan.run_space import check_run_folder_space

    cfg = _load(args)
    plan = build_plan(cfg)
    space = check_run_folder_space(cfg, plan)   # refuses a folder too small for the run
    if space is not None:
        print(space.describe())
    data = prepare.describe(cfg)
    if data:
        print(data)
    if args.dry_run:
        if cfg.cluster.executor == "local":
            print("# cluster.executor is 'local': tasks run on this machine, no sbatch script")
            print(plan.describe())
        else:
            print(executor.sbatch_script(cfg, plan))
        return 0
    job, prep = prepare.submit_job(cfg, plan, args.config)
    paths = executor.run_paths(cfg)
    if prep == "here":
        print(f"prepared {cfg.data.train} here")
    elif prep:
        print(f"submitted data preparation job {prep}; the training job starts after it succeeds")
    print(f"submitted job {job.job_id} ({cfg.mode}, {plan.world_size} tasks on {plan.nodes} node(s))")
    print(f"  logs:   {paths.job_logs(str(job.job_id))}")
    print(f"  tail:   tulu logs {job.job_id} -f")
    print(f"  status: tulu status {job.job_id}")
    if args.wait:
        from tulu.launch.ops import wait

        return wait(str(job.job_id), job)
    return 0


def cmd_pipeline(args) -> int:
    if _kind(args.config) == "job":
        raise CommandError("a job config (one stage), not a pipeline config", args.config,
                           f"submit it with: tulu submit {args.config} (a pipeline config looks like "
                           f"{PIPELINE_EXAMPLE})")
    from tulu.pipeline.config import load_pipeline
    from tulu.pipeline.driver import check_folder, fresh_entries, run

    pipeline = load_pipeline(args.config, list(args.set or []))
    if args.dry_run:
        from tulu.pipeline.steps import check_heldout

        check_heldout(pipeline.settings)  # what the data step would refuse
        if args.fresh:
            delete, keep = fresh_entries(pipeline)
        else:
            check_folder(pipeline)
        _print_pipeline_plan(pipeline)
        if args.fresh:
            print(f"# --fresh would delete in {pipeline.dir}: {', '.join(e.name for e in delete) or 'nothing'}"
                  + (f"; and keep: {', '.join(e.name for e in keep)}" if keep else ""))
        return 0
    return run(pipeline, wait=not args.no_wait, fresh=args.fresh)


def cmd_twin(args) -> int:
    _require_job_config(args.config)
    from tulu.twin import derive_twin, write_twin

    twin = derive_twin(args.config)
    out = write_twin(twin, args.out or f"runs/twins/{twin.config['run']['name']}")
    print(twin.report(), end="")
    print(f"config: {out}\nsubmit: tulu submit {out}")
    return 0


def cmd_logs(args) -> int:
    from tulu.launch.ops import logs

    return logs(args.job, follow=args.follow, rank=args.rank, group=args.group, lines=args.lines)


def cmd_status(args) -> int:
    from tulu.launch.ops import status

    info = status(args.job)
    if info.get("slurm_error"):
        raise CommandError("Slurm did not answer", f"job {info['job_id']}", info["slurm_error"])
    return 0


def cmd_cancel(args) -> int:
    from tulu.launch.ops import cancel

    return cancel(args.job)


def cmd_score(args) -> int:
    from tulu.rewards.score_cli import run

    return run(args)


def cmd_export(args) -> int:
    from tulu.export import run

    return run(args)


def _count(text: str) -> int:
    """A non-negative integer argument."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from tulu import export
    from tulu.rewards import score_cli

    p = argparse.ArgumentParser(prog="tulu", description="Slurm-native SFT/DPO/RLVR post-training",
                                epilog=f"Start with: tulu pipeline {PIPELINE_EXAMPLE}\n"
                                       "Each command's options: tulu COMMAND --help",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"tulu {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_, description=None, epilog=None):
        return sub.add_parser(name, help=help_, description=description or help_, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def config_args(sp, example, set_example):
        sp.add_argument("config", help=f"YAML config, e.g. {example}")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {set_example} (repeatable; a mapping "
                             "value merges into the section)")

    sp = add("plan", "print the rank layout and per-GPU memory; non-zero if it does not fit",
             epilog=f"examples:\n  tulu plan configs/tulu3-405b-rlvr.yaml\n"
                    f"  tulu plan {PIPELINE_EXAMPLE}      # a pipeline config: every stage's plan")
    config_args(sp, f"{JOB_EXAMPLE} (a job) or {PIPELINE_EXAMPLE} (a pipeline: plans each stage)",
                "groups.training.tp=2")
    sp.set_defaults(func=cmd_plan, mode=None)

    sp = add("submit", "validate, plan and submit a job (one stage: a job config)",
             epilog=f"examples:\n  tulu submit {JOB_EXAMPLE} --dry-run\n  tulu submit {JOB_EXAMPLE} --wait\n"
                    f"(a pipeline config such as {PIPELINE_EXAMPLE} runs with: tulu pipeline)")
    config_args(sp, JOB_EXAMPLE, "sft.max_steps=20")
    sp.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    sp.add_argument("--mode", choices=["train", "rehearse", "counter"], help="override the config's mode")
    sp.add_argument("--wait", action="store_true", help="wait for the job to finish, streaming its logs")
    sp.set_defaults(func=cmd_submit)

    sp = add("rehearse", "submit the layout in rehearse mode: form every group, one collective each",
             epilog="example:\n  tulu rehearse configs/tiny-cpu-rehearse.yaml --wait")
    config_args(sp, "configs/tiny-cpu-rehearse.yaml", "groups.training.pp=3")
    sp.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    sp.add_argument("--wait", action="store_true", help="wait for the job to finish, streaming its logs")
    sp.set_defaults(func=cmd_submit, mode="rehearse")

    sp = add("pipeline", "SFT -> on-policy DPO -> RLVR -> evaluation as chained jobs; "
             "prints the held-out accuracy table",
             epilog=f"examples:\n  tulu pipeline {PIPELINE_EXAMPLE}\n"
                    f"  tulu pipeline {PIPELINE_EXAMPLE} --set pipeline.name=seed2 --set pipeline.seed=2\n"
                    f"  tulu pipeline {PIPELINE_EXAMPLE} --fresh --dry-run   # what --fresh would delete\n"
                    f"(a job config such as {JOB_EXAMPLE} runs with: tulu submit)")
    config_args(sp, PIPELINE_EXAMPLE, "stages.rlvr.rlvr.steps=40")
    sp.add_argument("--no-wait", action="store_true", help="submit the chain and return (Slurm only)")
    sp.add_argument("--fresh", action="store_true",
                    help="start over: delete what this pipeline wrote in its folder (only a folder whose "
                         "pipeline.json names this pipeline; other files are kept); else stages resume")
    sp.add_argument("--dry-run", action="store_true", help="validate and plan every stage, submit nothing")
    sp.set_defaults(func=cmd_pipeline)

    sp = add("twin", "derive a preset's miniature twin (every structural feature, tiny sizes) for the local Slurm",
             description="Write the miniature twin of a preset: the same TP/PP/DP features at degree 2, uneven\n"
                         "pipeline stages, sequence parallel, distributed optimizer, reference and value models,\n"
                         "hub ids served from an offline mirror; only widths, lengths, counts and steps shrink.",
             epilog="example:\n  tulu twin configs/tulu3-405b-rlvr.yaml --out runs/twins/405b-rlvr\n"
                    "  tulu submit runs/twins/405b-rlvr/twin.yaml --wait")
    sp.add_argument("config", help="a preset (job config), e.g. configs/tulu3-405b-rlvr.yaml")
    sp.add_argument("--out", help="folder for twin.yaml, report.txt and the hub mirror "
                                  "(default runs/twins/twin-<preset>)")
    sp.set_defaults(func=cmd_twin)

    job_help = "a job id (tulu submit prints it) or a run folder, e.g. runs/tiny-cpu/rlvr"
    sp = add("logs", "show (and follow) the per-task logs of a job, across requeues",
             epilog="examples:\n  tulu logs 1234 -f\n  tulu logs runs/tiny-cpu/rlvr --group inference -n 0")
    sp.add_argument("job", help=job_help)
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    sp.add_argument("-n", "--lines", type=_count, default=40, help="lines per file to show first (0: all)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--rank", type=_count, help="only this global rank's logs")
    g.add_argument("--group", choices=["inference", "training"], help="only this group's ranks")
    sp.set_defaults(func=cmd_logs)

    for name, help_, func in (("status", "state, restarts, nodes, last step and the monitor's last report", cmd_status),
                              ("cancel", "cancel a Slurm job", cmd_cancel)):
        sp = add(name, help_)
        sp.add_argument("job", help=job_help)
        sp.set_defaults(func=func)

    # subcommands whose module owns its arguments
    for name, module, func, help_, description, example in (
            ("score", score_cli, cmd_score, "score a jsonl of completions with the RLVR verifiers",
             "Score a JSONL of completions (dataset, ground_truth, completion per line) with the\n"
             "RLVR verifiers; --out gets each row with reward and verified added (never the input).",
             "tulu score completions.jsonl --out scored.jsonl --workers 2"),
            ("export", export, cmd_export, "export a verified checkpoint as a Hugging Face folder",
             "Export a verified training checkpoint as a Hugging Face model folder that transformers\n"
             "and vLLM load. OUT must be new or empty (--force replaces it); it appears whole.",
             "tulu export runs/tiny-cpu/rlvr/checkpoints hf/tiny-rlvr")):
        sp = add(name, help_, description=description, epilog=f"example:\n  {example}")
        module.add_arguments(sp)
        sp.set_defaults(func=func)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures the user can act on: shown as one line, not a traceback."""
    found: list[type[BaseException]] = [ConfigError, CommandError, OSError, subprocess.SubprocessError]
    submitit_utils = sys.modules.get("submitit.core.utils")
    if submitit_utils is not None:  # sbatch refused the job
        found += [submitit_utils.FailedSubmissionError, submitit_utils.FailedJobError]
    return tuple(found)


def _one_line(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return f"config error: {e}"
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, subprocess.SubprocessError) or type(e).__module__.startswith("submitit"):
        return f"Slurm command failed: {str(e).strip() or type(e).__name__}"
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("TULU_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except BrokenPipeError:  # `tulu plan ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("tulu: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors meet the user
        if debug:
            traceback.print_exc()
        if isinstance(e, _expected_errors()):
            print(f"tulu: {_one_line(e)}", file=sys.stderr)
            return 2
        if not debug:
            print(f"tulu: unexpected error (a bug; TULU_DEBUG=1 shows the traceback): "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
