"""Which weights generate which step's rollouts (``rlvr.async_steps``), decided by the learner.

Training step ``s`` consumes rollouts ``R_s`` and turns weights ``W_s`` into ``W_{s+1}``. With
``async_steps = k`` the learner, at the start of step ``s``, asks the inference group for every
not yet requested ``R_g`` with ``g <= s + k`` and has them generated with ``W_s``; it sends
``W_s`` first when at least one is requested. So, in a run that starts at step 0:

- ``k = 0``: ``R_s`` comes from ``W_s`` (synchronous, on-policy: today's behaviour);
- ``k = 1``: ``R_0`` and ``R_1`` come from ``W_0``, then ``R_s`` from ``W_{s-1}``: the engine
  generates ``R_{s+1}`` while the learner trains on ``R_s`` (one-step off-policy, as
  open-instruct's async mode and verl's one-step-off-policy trainer).

Resume. A checkpoint at step ``c`` stores the rollouts that were requested but not consumed
(``R_c .. R_{c+k-1}``, generated with ``W_{c-k} .. W_{c-1}``); the resumed learner consumes them
first and asks for ``R_{c+k}`` with ``W_c``, which is what the uninterrupted run did, so the resumed
run repeats it exactly. Without stored rollouts (a synchronous run's checkpoint, or settings that
changed) the first steps after the resume are regenerated with the checkpoint's weights ``W_c``.
Either way the engine never generates with weights other than ones the learner sent it.

Every training rank runs the same schedule (the weight send is collective for TP peers), from the
same inputs: the step, the configured ``k``, and how many rollouts the checkpoint held.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RolloutSchedule:
    async_steps: int
    total_steps: int
    next_generated: int  # the first step whose rollouts have not been requested yet

    @classmethod
    def starting_at(cls, step: int, *, async_steps: int, total_steps: int, stored: int = 0) -> "RolloutSchedule":
        """The schedule of an attempt that starts at ``step`` holding ``stored`` rollouts of the
        steps ``step, step + 1, ...`` (from the checkpoint)."""
        return cls(async_steps, total_steps, step + stored)

    def requests(self, step: int) -> range:
        """The steps whose rollouts the learner requests at the start of ``step``, all to be
        generated with the weights ``W_step`` (empty: no weights are sent at this step). Advances
        the schedule."""
        last = min(step + self.async_steps, self.total_steps - 1)
        if self.next_generated < step:
            raise RuntimeError(f"rollout schedule: step {step} has no rollouts (the next requested step "
                               f"is {self.next_generated})")
        todo = range(self.next_generated, last + 1)
        self.next_generated = max(self.next_generated, last + 1)
        return todo

    def in_flight(self, step: int) -> range:
        """Steps whose rollouts were requested but not consumed, once ``step`` is the next to
        train: what a checkpoint taken now must hold to resume exactly."""
        return range(step, self.next_generated)
