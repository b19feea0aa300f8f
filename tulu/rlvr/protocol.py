"""What the roles tell each other through the bridge's TCPStore each step.

  rl/start                     the first step the inference group generates in this attempt
                               (after a resume: after the rollouts the checkpoint held)
  rl/<step>/control            {"action": "go", "weights": v}: generate step <step>'s rollouts
                               with weights version v (receive them first unless v is the
                               version already loaded); "stop" | "done": leave the loop
  rl/<step>/rollout/<engine>   the engine's completions for its share of the step's prompts,
                               the weights version that generated them, its phase timings, and
                               whether its ranks were asked to stop; the learner deletes it once
                               read
Weights travel separately (tulu.dist.weight_sync, version v = the learner's step that holds them,
``W_v``); `tulu.rlvr.rollout_schedule` says which version generates which step. With
``rlvr.reference_logprobs: inference`` the learner first sends the KL reference's weights as
version ``REFERENCE_VERSION`` (once per attempt, before any policy weights), and each completion
carries the reference's log-probs of its tokens. Rollouts are
small next to weights (token ids and one log-prob per token), so JSON through the store is
enough here.
"""

from __future__ import annotations

import json

START = "rl/start"
REFERENCE_VERSION = -1


def control_key(step: int) -> str:
    return f"rl/{step}/control"


def rollout_key(step: int, engine: int) -> str:
    return f"rl/{step}/rollout/{engine}"


def go(weights_version: int) -> dict:
    return {"action": "go", "weights": weights_version}


def put(store, key: str, value) -> None:
    store.set(key, json.dumps(value))


def get(store, key: str):
    """Blocks until the key exists (the store's own time-out applies)."""
    return json.loads(store.get(key))


def take(store, key: str):
    """Like :func:`get`, then deletes the key: consumed rollouts do not pile up in the store's
    memory over a long run."""
    value = get(store, key)
    store.delete_key(key)
    return value
