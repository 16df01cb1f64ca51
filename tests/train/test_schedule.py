import pytest

from moegpt.train.config import TrainConfig
from moegpt.train.schedule import BatchRamp, LRSchedule


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    s = LRSchedule(peak=1.0, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # halfway: floor + half the range
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))


def test_batch_ramps_from_start_to_full_in_micro_batch_multiples():
    r = BatchRamp(start=4, full=32, ramp_tokens=1000, multiple=4)
    assert r(0) == 4
    assert r(500) == 16
    assert r(999) % 4 == 0 and r(999) <= 32
    assert r(1000) == 32 and r(10**9) == 32
    assert BatchRamp(start=32, full=32, ramp_tokens=0)(0) == 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=10, micro_batch=4), r"batch_size \(10\) is not a multiple of micro_batch \(4\)"),
    (dict(batch_start=64), r"batch_start=64"),
    (dict(batch_start=4, micro_batch=8), r"batch_start \(4\) is not a multiple of micro_batch \(8\)"),
    (dict(warmup_steps=-1), r"warmup_steps \(-1\)"),
    (dict(min_lr_ratio=2.0), r"min_lr_ratio=2.0"),
    (dict(val_fraction=0.0), r"val_fraction=0.0"),
    (dict(steps=0), r"steps=0"),
])
def test_bad_train_configs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
