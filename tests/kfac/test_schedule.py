"""The cadence: when a step refreshes the curvature and when it runs cold, from the counters alone."""

from sb3_trpo_kfac.common.kfac.schedule import CurvatureSchedule, KFACCounters


def test_refreshes_follow_kfac_update_and_the_statistics():
    counters = KFACCounters()
    schedule = CurvatureSchedule(kfac_update=3, kfac_cold_iter=0, counters=counters)
    due = []
    for step in range(1, 11):
        if step in (1, 2, 3, 4, 5, 9):  # statistics at these steps only
            counters.stats_updates += 1
        schedule.count_step(refresh_curvature=True)
        due.append(schedule.curvature_due())
        if due[-1]:
            schedule.start_curvature()
            schedule.finish_curvature(counters.stats_updates, failures=0)
    # the first as soon as statistics exist, then every 3 steps while there are newer ones: step 7 takes step 5's,
    # none is due at 8 and 9 (step 9's come 2 steps after the last refresh), step 10 takes step 9's
    assert [step for step, is_due in enumerate(due, start=1) if is_due] == [1, 4, 7, 10]
    assert counters.curvature_updates == 4 and counters.stats_at_curvature == 6


def test_extra_steps_count_apart_and_cold_steps_count_updates():
    counters = KFACCounters()
    schedule = CurvatureSchedule(kfac_update=1, kfac_cold_iter=2, counters=counters)
    schedule.count_step(refresh_curvature=False)
    assert (counters.steps, counters.extra_steps) == (0, 1) and schedule.cold
    counters.updates = 2
    assert not schedule.cold
    assert counters["extra_steps"] == 1 and KFACCounters(**counters.as_dict()) == counters
    restored = KFACCounters()
    restored.load({**counters.as_dict(), "unknown": 5})
    assert restored == counters
