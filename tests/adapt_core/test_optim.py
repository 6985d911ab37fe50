import pytest
import torch
from torch import nn

from udaseg.config.schema import OptimConfig
from udaseg.engine.optim import PolyWarmupSchedule, build_optimizer, poly_warmup_lr
from udaseg.errors import UserError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.conv = nn.Conv2d(3, 4, 1)
        self.backbone.norm1 = nn.LayerNorm(4)
        self.backbone.pos_block = nn.Conv2d(4, 4, 1)
        self.backbone.frozen = nn.Linear(2, 2)
        self.backbone.frozen.requires_grad_(False)
        self.decode_head = nn.Module()
        self.decode_head.conv = nn.Conv2d(4, 2, 1)
        self.decode_head.norm = nn.BatchNorm2d(2)
        self.proj_head = nn.Linear(4, 4)


def _group_of(optimizer, param):
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def test_adamw_param_groups():
    model = Net()
    cfg = OptimConfig(lr=1e-3, head_lr_mult=10.0, weight_decay=0.01)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999)
    expect = {
        "backbone.conv.weight": (1e-3, 0.01),
        "backbone.norm1.weight": (1e-3, 0.0),
        "backbone.pos_block.bias": (1e-3, 0.0),
        "decode_head.conv.weight": (1e-2, 0.01),
        "decode_head.norm.weight": (1e-2, 0.01),  # "head" wins over "norm" (mmcv key order)
        "proj_head.weight": (1e-2, 0.01),
    }
    named = dict(model.named_parameters())
    for name, (lr, wd) in expect.items():
        group = _group_of(opt, named[name])
        assert group is not None, name
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == pytest.approx(wd), name
    assert _group_of(opt, named["backbone.frozen.weight"]) is None
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_sgd_keeps_decay_unless_asked():
    model = Net()
    cfg = OptimConfig(name="sgd", lr=0.01, weight_decay=5e-4, momentum=0.9)
    named = dict(model.named_parameters())
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert _group_of(opt, named["backbone.norm1.weight"])["weight_decay"] == pytest.approx(5e-4)
    assert _group_of(opt, named["decode_head.conv.weight"])["lr"] == pytest.approx(0.1)
    opt2 = build_optimizer(model, cfg, sgd_no_decay=True)
    assert _group_of(opt2, named["backbone.norm1.weight"])["weight_decay"] == 0.0


def test_bad_optimiser_name():
    with pytest.raises(UserError, match="optim.name"):
        build_optimizer(Net(), OptimConfig(name="adam"))


def _formula(base, t, T=100, W=10, ratio=1e-6, power=1.0, min_lr=0.0):
    lr = (base - min_lr) * (1 - t / T) ** power + min_lr
    if t < W:
        lr = lr * (1 - (1 - t / W) * (1 - ratio))
    return lr


def test_schedule_matches_formula():
    model = Net()
    cfg = OptimConfig(lr=6e-5, head_lr_mult=10.0, warmup_iters=10, warmup_ratio=1e-6, power=1.0)
    opt = build_optimizer(model, cfg)
    schedule = PolyWarmupSchedule(opt, cfg, max_iters=100)
    for t in [0, 1, 5, 9, 10, 11, 50, 99, 100]:
        schedule.step(t)
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(_formula(group["base_lr"], t), rel=1e-12, abs=1e-18)
    schedule.step(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * 1e-6)


def test_schedule_power_min_lr_and_state():
    assert poly_warmup_lr(1.0, 30, 100, power=0.9, min_lr=1e-4) == pytest.approx(
        (1 - 1e-4) * 0.7**0.9 + 1e-4
    )
    assert poly_warmup_lr(1.0, 150, 100, min_lr=0.0) == 0.0
    model = Net()
    cfg = OptimConfig(lr=1e-3, warmup_iters=0)
    opt = build_optimizer(model, cfg)
    schedule = PolyWarmupSchedule(opt, cfg, max_iters=10)
    schedule.step(4)
    state = schedule.state_dict()
    opt2 = build_optimizer(model, cfg)
    schedule2 = PolyWarmupSchedule(opt2, cfg, max_iters=10)
    schedule2.load_state_dict(state)
    assert schedule2.get_lr() == schedule.get_lr()
    assert schedule2.last_iter == 4


def test_optimizer_state_survives_weights_only_checkpoint(tmp_path):
    from udaseg.engine.checkpoint import load_checkpoint, save_checkpoint

    model = Net()
    cfg = OptimConfig(lr=1e-3, warmup_iters=2)
    opt = build_optimizer(model, cfg)
    schedule = PolyWarmupSchedule(opt, cfg, max_iters=20)
    schedule.step(3)
    loss = sum((p**2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    path = save_checkpoint(tmp_path / "s.pt", {"optimizer": opt.state_dict(), "scheduler": schedule.state_dict()})
    state = load_checkpoint(path)
    opt2 = build_optimizer(model, cfg)
    opt2.load_state_dict(state["optimizer"])
    schedule2 = PolyWarmupSchedule(opt2, cfg, max_iters=20)
    schedule2.load_state_dict(state["scheduler"])
    assert schedule2.get_lr() == schedule.get_lr()
    first = next(iter(opt.state.values()))
    restored = opt2.state[opt2.param_groups[0]["params"][0]]
    assert torch.equal(first["exp_avg"], restored["exp_avg"])
