"""Trainer callbacks that end a run at a wall-clock deadline instead of a step count.

`deltavlm demo` sizes its language stage by a budget in minutes. A step count sized from one timed step misses on
a machine whose speed varies, so these callbacks let the clock end the run (and, for CosineToDeadline, drive the
learning rate); `max_steps` is then only an upper bound.
"""

import math
import time

import torch
from transformers import TrainerCallback


class StopAtDeadline(TrainerCallback):
    """Ends a Trainer run once the wall clock passes `deadline` (a time.time() value). The step estimate the run
    was sized by can be off when something else loads the machine; this keeps the demo inside its budget. The model
    is exported as usual; the cosine schedule then ends above zero."""

    def __init__(self, deadline: float, say=print):
        self.deadline, self.say = deadline, say

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() > self.deadline and state.global_step < state.max_steps:
            self.say(self.stop_message(state))
            control.should_training_stop = True

    def stop_message(self, state) -> str:
        return f"the budget's deadline has passed: stopping at step {state.global_step} of {state.max_steps}"


class CosineToDeadline(StopAtDeadline):
    """StopAtDeadline whose learning rate follows the clock: after the Trainer's warm-up steps, a cosine from the
    peak rate to zero over the time from the run's start to `deadline`, however long the steps take. The Trainer's
    own cosine counts steps, and a step count sized by a timed step misses on a machine whose speed varies: on the
    EPYC (2026-11-27) the same code and data timed 4.2 s a step in one run and 4.9 s in the next; the first run's
    deadline stopped it at step 69 of 75, the second finished its 52 steps with a minute of the budget unused and
    lost three tasks to the constant baselines the first had beaten. Here the run ends at the deadline with the
    rate at zero, whatever the speed; `max_steps` is only an upper bound. Replaces the scheduler's `lr_lambdas`
    (a LambdaLR, as the Trainer's schedulers are), so the logged rate is the one used.

    With `budget_end` (a time.time() value) the deadline then follows the run's own median step time (from the
    third step) so as to leave `steps_after` steps' worth of time before `budget_end`, never past `latest`
    (default: the deadline given): what follows the stage (the evaluation) slows down and speeds up with the
    machine, and the step the demo timed before the run is an estimate. On the EPYC (2026-11-27) one run timed
    3.6 s a step and took 4.4-5.0 s, and the demo ended at 10.2 minutes of a 10-minute budget; the next timed 5.3 s
    and took ~4.7, and left 0.8 minutes unused."""

    def __init__(self, deadline: float, say=print, budget_end: float | None = None, steps_after: float = 0.0,
                 latest: float | None = None):
        super().__init__(deadline, say)
        if steps_after < 0:
            raise ValueError(f"CosineToDeadline: steps_after must be >= 0, got {steps_after}")
        self.budget_end, self.steps_after = budget_end, steps_after
        self.latest = deadline if latest is None else max(deadline, latest)
        self.step_seconds: list[float] = []
        self._last_step_end = None

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(f"CosineToDeadline needs the Trainer's LambdaLR scheduler, got {type(lr_scheduler).__name__}")
        begin = self._last_step_end = time.time()
        warmup = args.get_warmup_steps(state.max_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            progress = min(1.0, (time.time() - begin) / max(1e-3, self.deadline - begin))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        lr_scheduler.lr_lambdas = [factor] * len(lr_scheduler.lr_lambdas)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if self._last_step_end is not None:
            self.step_seconds.append(now - self._last_step_end)
        self._last_step_end = now
        if self.budget_end is not None and len(self.step_seconds) >= 3:
            median = sorted(self.step_seconds)[len(self.step_seconds) // 2]  # a curve probe's step is an outlier
            self.deadline = min(self.latest, self.budget_end - self.steps_after * median)
        super().on_step_end(args, state, control, **kwargs)

    def stop_message(self, state) -> str:
        return f"the stage's time is up after {state.global_step} steps (learning rate down to zero)"


def tail_deadline(deadline: float, tail_seconds: float, latest: float | None, now: float | None = None) -> float:
    """The focused tail's deadline, set when it starts: its planned `tail_seconds` from now, or the stage's
    `deadline` if that is later, never past `latest`. The mixed run's deadline follows its own step time and may
    end it after `deadline - tail_seconds`; a tail held to the planned `deadline` then starts with its time gone
    (the 60-minute demo on the EPYC, 2026-11-28: the mixed run ended at 40.7 min, after the stage's planned end,
    and the tail stopped after 1 step at a zero learning rate)."""
    now = time.time() if now is None else now
    planned = max(deadline, now + tail_seconds)
    return planned if latest is None else min(latest, planned)
