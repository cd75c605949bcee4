from fractions import Fraction

import pytest

from npp.models import gpt_config
from npp.train.schedule import PatchSchedule, Stage, paper_schedule, parse_schedule, schedule_cost_ratio


def test_parse_schedule():
    stages = parse_schedule("4:0.25,2:0.25,1:0.5", grid=(16, 16))
    assert stages == [Stage(4, Fraction(1, 4)), Stage(2, Fraction(1, 4)), Stage(1, Fraction(1, 2))]
    assert parse_schedule("1:1") == [Stage(1, Fraction(1))]
    assert parse_schedule("2:1/3, 1:2/3")[0].share == Fraction(1, 3)


@pytest.mark.parametrize(
    "text, match",
    [
        ("4:0.25,2:0.25,1:0.4", "sum to 0.9"),
        ("4:0.5,2:0.5", "last stage .* patch side 2"),
        ("3:0.5,1:0.5", "does not divide the 16x16"),
        ("4-0.5,1:0.5", "cannot read stage '4-0.5'"),
        ("4:0,1:1", "share of 0"),
        ("", "empty"),
    ],
)
def test_bad_schedules_rejected(text, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(text, grid=(16, 16))


@pytest.mark.parametrize(
    "levels, ends", [(2, [150, 300]), (3, [75, 150, 300]), (4, [37, 75, 150, 300]), (1, [300])]
)
def test_paper_schedule_epoch_boundaries(levels, ends):
    stages = paper_schedule(levels, 0.5, 300)
    assert [s.patch_side for s in stages] == [2 ** (levels - 1 - i) for i in range(levels)]
    steps_per_epoch = 7
    sched = PatchSchedule(stages, 300 * steps_per_epoch)
    assert [span.end for span in sched.spans] == [e * steps_per_epoch for e in ends]


def test_stage_at_switches_at_the_expected_steps():
    sched = PatchSchedule(parse_schedule("4:0.25,2:0.25,1:0.5"), 100)
    assert [sched.stage_at(s).patch_side for s in (0, 24, 25, 49, 50, 99, 150)] == [4, 4, 2, 2, 1, 1, 1]


def test_lr_restarts_warmup_then_constant_then_decays_in_each_stage():
    sched = PatchSchedule(parse_schedule("2:0.5,1:0.5"), 200)
    lr = lambda s: sched.lr_at(s, base_lr=1e-4, end_lr=1e-5, warmup_steps=10, decay_ratio=0.2)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(0.5e-4)
    assert lr(10) == lr(50) == lr(79) == 1e-4
    assert lr(80) == pytest.approx(1e-4)  # decay starts at 100 - 20
    assert lr(90) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert lr(99) == pytest.approx(1e-5 + 0.05 * 9e-5)
    assert lr(100) == 0.0  # the second stage warms up again
    assert lr(105) == pytest.approx(0.5e-4)
    assert lr(199) == pytest.approx(1e-5 + 0.05 * 9e-5)


def test_short_stage_shortens_warmup():
    sched = PatchSchedule(parse_schedule("1:1"), 10)
    values = [sched.lr_at(s, 1.0, 0.0, warmup_steps=50, decay_ratio=0.2) for s in range(10)]
    assert values[0] == 0.0 and max(values) == pytest.approx(1.0) and values[-1] < 1.0


def test_cost_ratios_match_facts():
    xxl = gpt_config("GPT-XXL")
    assert schedule_cost_ratio(paper_schedule(3, 0.5, 300), xxl) == pytest.approx(0.5765, abs=1e-4)
    assert schedule_cost_ratio(paper_schedule(2, 0.5, 300), xxl) == pytest.approx(0.6225, abs=1e-4)
    assert schedule_cost_ratio(parse_schedule("1:1"), xxl) == 1.0
    # sequence-length-only accounting (no attention term) of docs/method.md: 0.578 and 0.625
    seq = {1: 256, 2: 64, 4: 16}
    l3 = paper_schedule(3, 0.5, 300)
    assert sum(float(s.share) * seq[s.patch_side] for s in l3) / 256 == pytest.approx(0.578, abs=1e-3)


def test_flops_per_sample_per_stage():
    cfg = gpt_config("GPT-B")
    sched = PatchSchedule(parse_schedule("4:0.25,2:0.25,1:0.5"), 8)
    f4, f2, f1 = sched.flops_per_sample(cfg)
    assert f4 < f2 < f1
    assert f1 / f2 == pytest.approx(4.0, rel=0.05)  # 4x the positions, plus a little attention


def test_too_few_steps_for_stages():
    with pytest.raises(ValueError, match="gets no step"):
        PatchSchedule(parse_schedule("4:0.01,1:0.99"), 10)
