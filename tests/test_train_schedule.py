import pytest
import torch

from chatterbox.train.schedule import WarmupDecaySchedule, upstream_extra_steps, warmup_decay_lr

T, W, LR = 15000, 50, 3e-5


def make(total=T, warmup=W):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return opt, WarmupDecaySchedule(opt, total, warmup, LR)


def closed_form(s):  # spec/upstream.md §2.4, written out independently of the implementation
    return LR * s / W if s < W else LR * max(0.0, (T - s) / (T - W))


@pytest.mark.parametrize("s", [0, 1, 25, 49, 50, 51, 7500, 14999, 15000, 16000])
def test_closed_form(s):
    assert warmup_decay_lr(s, T, W, LR) == pytest.approx(closed_form(s), abs=1e-15)


def test_schedule_follows_closed_form_step_by_step():
    opt, sched = make()
    for k in range(200):
        assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(k), abs=1e-15)
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_upstream_double_stepping_reaches_zero_halfway():
    opt, sched = make()
    lrs = []
    for g in range(8000):
        lrs.append(opt.param_groups[0]["lr"])  # LR of global step g's optimizer step
        opt.step()
        sched.step()  # DeepSpeed's step inside engine.step()
        for _ in range(upstream_extra_steps(g)):
            sched.step()  # upstream's manual scheduler.step()
    assert lrs[0] == closed_form(0)
    for g in (1, 10, 24, 25, 26, 1000, 7000):
        assert lrs[g] == pytest.approx(closed_form(2 * g - 1), abs=1e-15)
    first_zero = next(g for g, lr in enumerate(lrs) if g > W and lr == 0.0)
    assert first_zero == 7501  # f(2g-1) = 0 once 2g-1 >= 15000


def test_lr_scale_multiplies_one_groups_whole_schedule():
    """train.lr_scale: the region encoder at a tenth of the rate, every step of warm-up and decay; the
    groups are built from the trainable parameters' table rows."""
    from torch import nn

    from chatterbox.train.engine import optimizer_groups

    model = nn.ModuleDict({"region_encoder": nn.Linear(2, 2), "query_head": nn.Linear(2, 2),
                           "clip_tower": nn.Linear(2, 2)})
    model["clip_tower"].requires_grad_(False)
    groups = optimizer_groups(model, {"region_encoder": 0.1})
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert [len(g["params"]) for g in groups] == [2, 2]  # query head; region encoder (the frozen CLIP in neither)
    assert groups[1]["params"][0] is model["region_encoder"].weight
    opt = torch.optim.AdamW(groups, lr=LR)
    sched = WarmupDecaySchedule(opt, T, W, LR)
    for k in range(T):
        assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(k), abs=1e-15)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * closed_form(k), abs=1e-15)
        opt.step()
        sched.step()
    assert [g["lr_scale"] for g in optimizer_groups(model, {})] == [1.0]
