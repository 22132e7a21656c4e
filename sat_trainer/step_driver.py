"""SAT's part of one optimizer step, written once for every training loop that runs it.

A loop calls, per optimizer step: :meth:`StepDriver.begin_step` with the step's omission rate
(a new draw number: the next forward draws a new kept set, reused by the step's other
micro-batches and by gradient-checkpoint recompute), :meth:`StepDriver.micro_batch_done` after
each micro-batch but the last (``draw_every: micro_batch`` draws again), then
:meth:`StepDriver.before_optimizer_step` and :meth:`StepDriver.after_optimizer_step` around the
optimizer step (``omitted_update``, :mod:`sat_trainer.omitted_update`). :class:`SATCallback`
drives a Trainer's steps with it, and ``--compare-dense``'s interleaved step timing its own, so a
timed step does what a trained one does.
"""

from __future__ import annotations

from .config import SATConfig
from .omitted_update import OmittedUpdate
from .patch.model import SATHandle


class StepDriver:
    """Drives ``handle``'s draws and omitted update step by step (see the module docstring).

    ``draw_id`` is the latest draw number; it starts at ``draw_id`` (a resumed run's saved one),
    so that the draws, seeded by it, continue where the run left off.
    """

    def __init__(self, handle: SATHandle, config: SATConfig, draw_id: int = 0):
        self.handle = handle
        self.draw_every = config.draw_every
        self.omitted = OmittedUpdate(handle, config.omitted_update, config.momentum_decay)
        self.draw_id = draw_id
        handle.start_draw(draw_id)

    def begin_step(self, rate: float | dict[str, float]) -> None:
        """A new optimizer step at omission ``rate`` (one per target under schedule est:
        :func:`~sat_trainer.schedule.step_rates`): its first forward draws a new kept set."""
        self.handle.set_rate(rate)
        self._new_draw()

    def micro_batch_done(self) -> None:
        """A micro-batch other than the step's last has run its backward: ``draw_every: micro_batch`` draws anew."""
        if self.draw_every == "micro_batch":
            self._new_draw()

    def before_optimizer_step(self, optimizer) -> None:
        """Just before ``optimizer.step()``: what ``omitted_update`` does to the omitted slices first."""
        self.omitted.before_step(optimizer)

    def after_optimizer_step(self) -> None:
        """Just after ``optimizer.step()``: ``freeze`` writes the omitted slices back."""
        self.omitted.after_step()

    def _new_draw(self) -> None:
        self.draw_id += 1
        self.handle.start_draw(self.draw_id)
