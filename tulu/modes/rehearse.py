"""Rehearsal: form every group of the real layout and run one collective in each.

This is how a user checks a 32-node layout before spending a day on it: each rank reports the
members it actually got and the collective's result; global rank 0 gathers the reports into
`<run_dir>/rehearsal/<job_id>/report.{json,txt}` and fails the job if any group disagrees
with the plan.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tulu.dist import groups as tdist
from tulu.atomic import write_json_atomic
from tulu.launch.context import JobContext

PAYLOAD_MB = 4


def _check_group(name: str, group, expected_global: list[int], to_global, ctx: JobContext) -> dict:
    members = [to_global(r) for r in dist.get_process_group_ranks(group)] if group is not None else expected_global
    value = torch.tensor([float(ctx.env.global_rank)])
    if tdist.backend() == "nccl":
        value = value.cuda()
    t0 = time.perf_counter()
    dist.all_reduce(value, group=group)
    seconds = time.perf_counter() - t0
    expected_sum = float(sum(expected_global))
    ok = sorted(members) == sorted(expected_global) and value.item() == expected_sum
    return {"group": name, "members": sorted(members), "expected_members": sorted(expected_global),
            "all_reduce_sum": value.item(), "expected_sum": expected_sum, "seconds": seconds, "ok": ok}


def _training_groups(ctx: JobContext) -> list[dict]:
    from megatron.core import parallel_state as ps

    plan, role = ctx.plan, ctx.role
    ps.initialize_model_parallel(tensor_model_parallel_size=plan.training_tp,
                                 pipeline_model_parallel_size=plan.training_pp)
    base = plan.inference_gpus

    def to_global(r):
        return r + base

    def ranks(pred):
        return [base + r for r in range(plan.training_gpus) if pred(*plan.training_coords(r))]

    tp, dp, pp = role.tp_rank, role.dp_rank, role.pp_rank
    out = [_check_group("training (role world)", None, ranks(lambda *_: True), to_global, ctx),
           _check_group("tensor parallel", ps.get_tensor_model_parallel_group(),
                        ranks(lambda t, d, p: d == dp and p == pp), to_global, ctx),
           _check_group("pipeline parallel", ps.get_pipeline_model_parallel_group(),
                        ranks(lambda t, d, p: t == tp and d == dp), to_global, ctx),
           _check_group("data parallel", ps.get_data_parallel_group(),
                        ranks(lambda t, d, p: t == tp and p == pp), to_global, ctx)]
    ps.destroy_model_parallel()
    return out


def _inference_groups(ctx: JobContext) -> list[dict]:
    plan, role = ctx.plan, ctx.role
    per_engine = plan.inference_tp * plan.inference_pp
    engine_groups = [dist.new_group(list(range(e * per_engine, (e + 1) * per_engine)))
                     for e in range(plan.inference_engines)]
    mine = list(range(role.dp_rank * per_engine, (role.dp_rank + 1) * per_engine))
    return [_check_group("inference (role world)", None, list(range(plan.inference_gpus)), int, ctx),
            _check_group(f"inference engine {role.dp_rank}", engine_groups[role.dp_rank], mine, int, ctx)]


def _bridge(ctx: JobContext) -> dict:
    bridge = tdist.BridgeGroup.for_role(ctx.plan, ctx.role, ctx.env)
    payload = torch.arange(PAYLOAD_MB * 2**20 // 4, dtype=torch.float32) if bridge.rank == 0 else \
        torch.zeros(PAYLOAD_MB * 2**20 // 4, dtype=torch.float32)
    bridge.barrier()
    t0 = time.perf_counter()
    bridge.broadcast(payload, src=0)
    seconds = time.perf_counter() - t0
    received_ok = bool(payload[-1].item() == payload.numel() - 1 and payload[1].item() == 1)
    total = bridge.all_reduce(torch.tensor([float(ctx.env.global_rank)])).item()
    members = ctx.plan.bridge_members()
    return {"group": "bridge", "members": members, "bridge_rank": bridge.rank, "broadcast_mb": PAYLOAD_MB,
            "broadcast_seconds": seconds, "broadcast_ok": received_ok, "all_reduce_sum": total,
            "expected_sum": float(sum(members)), "ok": received_ok and total == float(sum(members))}


def run(ctx: JobContext) -> dict:
    out_dir = ctx.run_dir / "rehearsal" / ctx.env.job_id
    with ctx.phase("setup", 0):
        tdist.init_role_world(ctx.plan, ctx.role, ctx.env, timeout_s=ctx.cfg.monitoring.collective_timeout_s)
        groups = _training_groups(ctx) if ctx.role.role == "training" else _inference_groups(ctx)
        if ctx.role.bridge_rank is not None:
            groups.append(_bridge(ctx))
        dist.barrier()
        dist.destroy_process_group()
    mine = {"global_rank": ctx.env.global_rank, "node": ctx.env.node, "hostname": ctx.env.hostname,
            "role": ctx.role.role, "role_rank": ctx.role.role_rank, "tp_rank": ctx.role.tp_rank,
            "pp_rank": ctx.role.pp_rank, "dp_rank": ctx.role.dp_rank, "bridge_rank": ctx.role.bridge_rank,
            "gpu": tdist.task_gpu(ctx.env.local_rank),
            "groups": groups, "ok": all(g["ok"] for g in groups)}
    write_json_atomic(out_dir / f"rank_{ctx.env.global_rank:05d}.json", mine)
    for g in groups:
        ctx.log(f"group {g['group']}: members {g['members']} all_reduce {g['all_reduce_sum']} "
                f"(expected {g['expected_sum']}) {'ok' if g['ok'] else 'MISMATCH'}")
    if ctx.is_global_leader:
        return _gather(ctx, out_dir)
    return {"ok": mine["ok"]}


def _shared_gpus(ranks: list[dict]) -> dict[str, list[int]]:
    """{"node N GPU g": [ranks]} for every GPU that more than one rank of a node would use."""
    owners: dict[str, list[int]] = {}
    for r in ranks:
        if r.get("gpu") is not None:
            owners.setdefault(f"node {r['node']} GPU {r['gpu']}", []).append(r["global_rank"])
    return {k: sorted(v) for k, v in owners.items() if len(v) > 1}


def _gather(ctx: JobContext, out_dir: Path, timeout_s: float = 120.0) -> dict:
    deadline = time.time() + timeout_s
    files = []
    while time.time() < deadline:
        files = sorted(out_dir.glob("rank_*.json"))
        if len(files) >= ctx.plan.world_size:
            break
        time.sleep(0.2)
    ranks = [json.loads(f.read_text()) for f in files]
    missing = sorted(set(range(ctx.plan.world_size)) - {r["global_rank"] for r in ranks})
    shared = _shared_gpus(ranks)
    ok = not missing and not shared and all(r["ok"] for r in ranks)
    report = {"job_id": ctx.env.job_id, "ok": ok, "missing_ranks": missing, "shared_gpus": shared,
              "plan": ctx.plan.describe(),
              "ranks": ranks}
    write_json_atomic(out_dir / "report.json", report)
    lines = [f"rehearsal of job {ctx.env.job_id}: {'OK' if ok else 'FAILED'}", ctx.plan.describe(), ""]
    for r in ranks:
        lines.append(f"rank {r['global_rank']:>4} node {r['node']} ({r['hostname']}) {r['role']}:{r['role_rank']} "
                     f"GPU {r.get('gpu')}")
        for g in r["groups"]:
            extra = f" broadcast {g['broadcast_mb']} MB in {g['broadcast_seconds']:.3f} s" if "broadcast_mb" in g else ""
            lines.append(f"      {g['group']:<24} members {g['members']} sum {g['all_reduce_sum']:.0f} "
                         f"{'ok' if g['ok'] else 'MISMATCH (expected ' + str(g['expected_members']) + ')'}{extra}")
    if missing:
        lines.append(f"missing reports from ranks {missing}")
    for where, owners in shared.items():
        lines.append(f"GPU {where} is used by ranks {owners}: one task per GPU expected")
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    ctx.log(f"rehearsal report: {out_dir / 'report.txt'} ({'OK' if ok else 'FAILED'})")
    if not ok:
        raise RuntimeError(f"rehearsal failed; see {out_dir / 'report.txt'}")
    return {"ok": True, "report": str(out_dir / "report.txt")}
