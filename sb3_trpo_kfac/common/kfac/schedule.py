"""The cadence of K-FAC: when the curvature is refreshed, when a step runs cold, and the counters behind both."""

import dataclasses
from typing import Any


@dataclasses.dataclass
class KFACCounters:
    """What happened so far (saved with the optimizer's state as ``kfac_counters``); read as ``counters["steps"]``."""

    steps: int = 0  # calls of step(), except those with refresh_curvature=False (extra_steps)
    extra_steps: int = 0  # calls of step(refresh_curvature=False)
    updates: int = 0  # steps whose preconditioned gradient was applied (extra steps not counted)
    skipped_steps: int = 0  # steps refused because of a non-finite gradient or trust-region scale
    stats_updates: int = 0  # successful update_statistics() calls
    skipped_stats: int = 0  # statistics refused because they were not finite
    curvature_updates: int = 0  # eigendecompositions / inversions of all factors
    stats_at_curvature: int = 0  # stats_updates at the last curvature update
    steps_at_curvature: int = 0  # steps at the last step that started a curvature update
    decomposition_failures: int = 0  # factors whose decomposition failed (previous one kept)

    def __getitem__(self, name: str) -> int:
        return getattr(self, name)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load(self, saved: dict[str, Any]) -> None:
        """:param saved: as returned by :meth:`as_dict` (unknown names are ignored, missing ones kept)"""
        for field in dataclasses.fields(self):
            if field.name in saved:
                setattr(self, field.name, int(saved[field.name]))


class CurvatureSchedule:
    """
    When a step refreshes the curvature (``kfac_update``) and when it is a cold-start step (``kfac_cold_iter``).

    A refresh is due at the first step with statistics newer than the last curvature at least ``kfac_update`` steps
    after the step that started it (every ``kfac_update`` steps when statistics come every step, right after the
    statistics when they come less often). The first refresh is due as soon as statistics exist.

    :param kfac_update: steps between curvature refreshes
    :param kfac_cold_iter: number of initial updates that are cold-start steps
    :param counters: the counters it reads and advances
    """

    def __init__(self, kfac_update: int, kfac_cold_iter: int, counters: KFACCounters) -> None:
        self.kfac_update = kfac_update
        self.kfac_cold_iter = kfac_cold_iter
        self.counters = counters

    def count_step(self, refresh_curvature: bool) -> None:
        """A step began (``refresh_curvature=False``: an extra step on the statistics of the previous one)."""
        if refresh_curvature:
            self.counters.steps += 1
        else:
            self.counters.extra_steps += 1

    @property
    def has_curvature(self) -> bool:
        return self.counters.curvature_updates > 0

    @property
    def statistics_newer_than_curvature(self) -> bool:
        return self.counters.stats_updates > self.counters.stats_at_curvature

    def curvature_due(self) -> bool:
        """Whether this step (a refreshing one) should start a curvature update."""
        since_last = self.counters.steps - self.counters.steps_at_curvature
        return self.statistics_newer_than_curvature and (not self.has_curvature or since_last >= self.kfac_update)

    def start_curvature(self) -> None:
        self.counters.steps_at_curvature = self.counters.steps

    def finish_curvature(self, stats_updates: int, failures: int) -> None:
        """
        :param stats_updates: the statistics the new curvature reflects
        :param failures: factors whose decomposition failed (their previous one was kept)
        """
        self.counters.decomposition_failures += failures
        self.counters.curvature_updates += 1
        self.counters.stats_at_curvature = stats_updates

    @property
    def cold(self) -> bool:
        """Whether the next update is a cold-start step (clipped gradient, no preconditioning, no trust region)."""
        return self.counters.updates < self.kfac_cold_iter
