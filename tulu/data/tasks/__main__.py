"""``python -m tulu.data.tasks OUT_DIR --seed 0``: write the task data, print the paths."""

from __future__ import annotations

import argparse

from tulu.data.tasks import TASKS, write_task_data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tulu.data.tasks",
                                description="Write the verifiable task data (gsm8k, math, ifeval) as jsonl.")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-task", type=int, default=2000)
    p.add_argument("--heldout-per-task", type=int, default=128)
    p.add_argument("--sft-per-task", type=int, default=2000)
    p.add_argument("--sft-slip", type=float, default=0.0,
                   help="share of SFT answers from a careless teacher, which the verifiers reject (0..1)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    a = p.parse_args(argv)
    try:
        paths = write_task_data(a.out_dir, seed=a.seed, train_per_task=a.train_per_task,
                                heldout_per_task=a.heldout_per_task, sft_per_task=a.sft_per_task, sft_slip=a.sft_slip,
                                tasks=[t.strip() for t in a.tasks.split(",") if t.strip()])
    except ValueError as exc:   # an unknown task, or more held-out prompts than exist
        p.error(str(exc))
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
