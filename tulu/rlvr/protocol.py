"""What the roles tell each other through the bridge's TCPStore each step.

  rl/start                     the learner's first step (after resume), set once per attempt
  rl/<step>/control            "go" | "stop" | "done": whether the inference group runs step <step>
  rl/<step>/rollout/<engine>   the engine's completions for its share of the step's prompts,
                               its phase timings, and whether its ranks were asked to stop
Weights travel separately (tulu.weight_sync, version = step). Rollouts are small next to
weights (token ids and one log-prob per token), so JSON through the store is enough here.
"""

from __future__ import annotations

import json

START = "rl/start"


def control_key(step: int) -> str:
    return f"rl/{step}/control"


def rollout_key(step: int, engine: int) -> str:
    return f"rl/{step}/rollout/{engine}"


def put(store, key: str, value) -> None:
    store.set(key, json.dumps(value))


def get(store, key: str):
    """Blocks until the key exists (the store's own time-out applies)."""
    return json.loads(store.get(key))
