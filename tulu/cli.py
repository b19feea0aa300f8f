"""`tulu`: plan, submit, rehearse, pipeline, logs, status, cancel, score, export."""

from __future__ import annotations

import argparse
import sys

from tulu.config import ConfigError, load_config


def _load(args) -> "JobConfig":  # noqa: F821
    overrides = list(args.set or [])
    if getattr(args, "mode", None):
        overrides.append(f"mode={args.mode}")
    return load_config(args.config, overrides)


def cmd_plan(args) -> int:
    from tulu.plan import build_plan

    cfg = _load(args)
    print(build_plan(cfg).describe())
    return 0


def cmd_submit(args) -> int:
    from tulu.launch import executor
    from tulu.plan import build_plan

    cfg = _load(args)
    plan = build_plan(cfg)
    if args.dry_run:
        if cfg.cluster.executor == "local":
            print("# cluster.executor is 'local': tasks run on this machine, no sbatch script")
            print(plan.describe())
        else:
            print(executor.sbatch_script(cfg, plan))
        return 0
    job = executor.submit(cfg, plan, args.config)
    paths = executor.run_paths(cfg)
    print(f"submitted job {job.job_id} ({cfg.mode}, {plan.world_size} tasks on {plan.nodes} node(s))")
    print(f"  logs:   {paths.job_logs(str(job.job_id))}")
    print(f"  tail:   tulu logs {job.job_id} -f")
    print(f"  status: tulu status {job.job_id}")
    if args.wait:
        from tulu.ops import wait

        return wait(str(job.job_id), job)
    return 0


def cmd_pipeline(args) -> int:
    from tulu.pipeline.config import load_pipeline
    from tulu.pipeline.driver import run

    pipeline = load_pipeline(args.config, list(args.set or []))
    if args.dry_run:
        from tulu.pipeline.driver import plan_stages

        for stage, plan in plan_stages(pipeline).items():
            print(f"# stage {stage}: {pipeline.jobs[stage].run_dir}")
            print(plan.describe())
        return 0
    return run(pipeline, wait=not args.no_wait, fresh=args.fresh)


def cmd_logs(args) -> int:
    from tulu.ops import logs

    return logs(args.job, follow=args.follow, rank=args.rank, group=args.group, lines=args.lines)


def cmd_status(args) -> int:
    from tulu.ops import status

    status(args.job)
    return 0


def cmd_cancel(args) -> int:
    from tulu.ops import cancel

    return cancel(args.job)


def cmd_score(args) -> int:
    from tulu.rewards.score_cli import main as score_main

    return score_main(args.rest)


def cmd_export(args) -> int:
    from tulu.export import main as export_main

    return export_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulu", description="Slurm-native SFT/DPO/RLVR post-training")
    sub = p.add_subparsers(dest="command", required=True)

    def config_cmd(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config, e.g. configs/tiny-cpu-sft.yaml")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set groups.training.tp=2 (repeatable)")
        return sp

    sp = config_cmd("plan", "print the rank layout and per-GPU memory; non-zero if it does not fit")
    sp.set_defaults(func=cmd_plan, mode=None)
    sp = config_cmd("submit", "validate, plan and submit a job")
    sp.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    sp.add_argument("--mode", choices=["train", "rehearse", "counter"], help="override the config's mode")
    sp.add_argument("--wait", action="store_true", help="wait for the job to finish, streaming its logs")
    sp.set_defaults(func=cmd_submit)
    sp = config_cmd("rehearse", "submit the layout in rehearse mode: form every group, one collective each")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--wait", action="store_true")
    sp.set_defaults(func=cmd_submit, mode="rehearse")

    sp = config_cmd("pipeline", "SFT -> on-policy DPO -> RLVR -> evaluation as chained jobs; "
                    "prints the held-out accuracy table")
    sp.add_argument("--no-wait", action="store_true", help="submit the chain and return (Slurm only)")
    sp.add_argument("--fresh", action="store_true", help="delete the pipeline's folder first (else stages resume)")
    sp.add_argument("--dry-run", action="store_true", help="validate and plan every stage, submit nothing")
    sp.set_defaults(func=cmd_pipeline)

    sp = sub.add_parser("logs", help="show (and follow) the per-task logs of a job, across requeues")
    sp.add_argument("job", help="job id or run folder")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("-n", "--lines", type=int, default=40, help="lines per file to show first (0: all)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int)
    g.add_argument("--group", choices=["inference", "training"])
    sp.set_defaults(func=cmd_logs)
    sp = sub.add_parser("status", help="state, restarts, nodes, last step and the monitor's last report")
    sp.add_argument("job")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("cancel", help="cancel a job")
    sp.add_argument("job")
    sp.set_defaults(func=cmd_cancel)
    sp = sub.add_parser("score", help="score a jsonl of completions with the RLVR verifiers", add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_score)
    sp = sub.add_parser("export", help="export a verified checkpoint as a Hugging Face folder", add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"tulu: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"tulu: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tulu plan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
