"""Objective-owned optimisers (a toy discriminator), post-step hooks and per-module EMA rates."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.adapt.adversarial import adversarial_losses, frozen
from udaseg.adapt.step import Need, Objective
from udaseg.adapt.teacher import EMATeacher
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import Method, register_method
from udaseg.methods.base import SupervisedSegmentation
from udaseg.methods.dacs import PseudoLabelSelfTraining

from .conftest import tiny_config
from .toy_methods import ToyDiscriminator  # noqa: F401  (registers the method 'toy_adversarial')


class BankAfterStep(Objective):
    """Enqueues the student's detached mean source logits after the optimiser step."""

    name = "toy_bank"

    def __init__(self, size: int = 3):
        super().__init__()
        self.register_buffer("bank", torch.zeros(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.order: list[str] = []

    def needs(self, iteration):
        return [Need("student", "source")]

    def prepare(self, ctx, batch):
        ctx.state["toy_param_before"] = next(ctx.student_model.parameters()).detach().clone()

    def losses(self, ctx, group):
        if group == "source":
            ctx.state["toy_value"] = float(ctx.student("source").logits.detach().mean())
            self.order.append("losses")
        return {}

    def after_step(self, ctx):
        self.order.append("after_step")
        # the hook runs after the optimiser moved the student
        assert not torch.equal(ctx.state["toy_param_before"], next(ctx.student_model.parameters()))
        self.bank.copy_(torch.roll(self.bank, 1))
        self.bank[0] = ctx.state["toy_value"]
        self.count += 1


@register_method("toy_momentum")
def build_toy_momentum(cfg, segmentor):
    head = nn.Conv2d(segmentor.tap_channels("enc_last"), 4, 1)
    return Method([SupervisedSegmentation("source"), PseudoLabelSelfTraining(cfg.method.self_training, cfg.data.mean,
                                                                            cfg.data.std), BankAfterStep()],
                  heads={"momentum_head": (head, "enc_last")}, uses_teacher=True, uses_target=True,
                  ema_rates={"heads.momentum_head": 0.5})


def _owned_state(trainer):
    (entry,) = trainer.owned.entries.values()
    return entry


def test_discriminator_has_its_own_optimiser_and_is_absent_from_teacher_and_segmentor_groups(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", extra=["method.name=toy_adversarial"])
    trainer = Trainer(cfg, progress=False)
    disc = trainer.method.objectives[1].discriminator
    disc_ids = {id(p) for p in disc.parameters()}
    segmentor_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert disc_ids and not disc_ids & segmentor_ids
    assert not any(id(p) in disc_ids for p in trainer.model.parameters())
    assert set(trainer.owned.entries) == {"toy_adversarial.discriminator"}
    before = [p.detach().clone() for p in disc.parameters()]
    trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    record = __import__("udaseg.engine.logging", fromlist=["x"]).read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert {"target.adv_g", "target.adv_d", "lr.toy_adversarial.discriminator"} <= set(record[-1])
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert "toy_adversarial.discriminator" in state["owned_optimizers"]
    assert any(k.startswith("1.discriminator.") for k in state["objectives"])


def test_generator_loss_reaches_only_the_segmentor_and_discriminator_loss_only_the_discriminator():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    disc = nn.Conv2d(3, 1, 3, padding=1)
    source = torch.randn(2, 3, 8, 8).softmax(1)
    generator, discriminator = adversarial_losses(disc, source, logits.softmax(1))
    generator.backward(retain_graph=True)
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    logits.grad = None
    discriminator.backward()
    assert logits.grad is None and all(p.grad is not None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())
    # plain formula: BCE with logits against constant domain labels (0 = source, 1 = target)
    with torch.no_grad():
        d_t, d_s = disc(logits.softmax(1)), disc(source)
        expect_g = -F.logsigmoid(-d_t).mean()
        expect_d = 0.5 * (-F.logsigmoid(-d_s).mean() - F.logsigmoid(d_t).mean())
    torch.testing.assert_close(generator.detach(), expect_g)
    torch.testing.assert_close(discriminator.detach(), expect_d)


def test_frozen_restores_flags_after_an_error():
    module = nn.Linear(2, 2)
    module.bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(module):
            assert not module.weight.requires_grad
            raise RuntimeError("boom")
    assert module.weight.requires_grad and not module.bias.requires_grad


def test_discriminator_optimiser_state_resumes_exactly(fake_domains, tmp_path):
    extra = ["method.name=toy_adversarial", "train.checkpoint_interval=2"]
    straight = Trainer(tiny_config("digits_source_only", *fake_domains, tmp_path / "a", 4, extra=extra), progress=False)
    straight.train()
    half_cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "b", 4, extra=extra)
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 2
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    assert _owned_state(second).schedule.last_iter == 1
    second.train()
    for a, b in zip(straight.objectives.parameters(), second.objectives.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt_a, opt_b = _owned_state(straight).optimizer.state_dict(), _owned_state(second).optimizer.state_dict()
    for key, value in opt_a["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(value[name], opt_b["state"][key][name], rtol=0, atol=0)


def test_resume_from_a_checkpoint_of_another_method_is_a_clear_error(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", 1)
    Trainer(cfg, progress=False).train()
    other = tiny_config("digits_source_only", *fake_domains, tmp_path / "run2", 2,
                        extra=["method.name=toy_adversarial"])
    with pytest.raises(UserError, match="saved by method 'source_only', the config trains 'toy_adversarial'"):
        Trainer(other, resume=str(tmp_path / "run" / "latest.pt"), progress=False)


def test_post_step_hook_and_second_ema_rate(fake_domains, tmp_path):
    cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "run", 3, extra=["method.name=toy_momentum",
                                                                               "method.self_training.ema_alpha=0.9"])
    trainer = Trainer(cfg, progress=False)
    bank = trainer.method.objectives[2]
    teacher = trainer.teacher
    student_names = dict(trainer.model.named_parameters())
    snapshots = []
    original_update = teacher.update

    def recording_update(it):
        snapshots.append(({n: p.detach().clone() for n, p in teacher.module.named_parameters()},
                          {n: p.detach().clone() for n, p in student_names.items()}))
        original_update(it)
        snapshots[-1] += ({n: p.detach().clone() for n, p in teacher.module.named_parameters()},)

    teacher.update = recording_update
    trainer.train()
    assert bank.order == ["losses", "after_step"] * 3 and int(bank.count) == 3
    assert bank.bank[2] != 0 and bank.bank[0] != bank.bank[1]
    for it, (before, student, after) in enumerate(snapshots):
        for name, value in after.items():
            rate = 0.5 if name.startswith("heads.momentum_head") else 0.9
            alpha = 0.0 if it == 0 else min(1 - 1 / (it + 1), rate)
            expected = student[name] if it == 0 else alpha * before[name] + (1 - alpha) * student[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    # iteration 2: the head's α is 0.5, the rest 2/3: the head's teacher lags less
    assert teacher.rates == {"heads.momentum_head": 0.5}
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    torch.testing.assert_close(state["objectives"]["2.bank"], bank.bank)


def test_ema_rate_groups_use_the_longest_matching_prefix():
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "ab": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    teacher = EMATeacher(model, 0.9, {"a": 0.2, "ab": 0.6})
    teacher.update(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in teacher.module.named_parameters()}
    teacher.update(9)
    for name, value in teacher.module.named_parameters():
        rate = 0.6 if name.startswith("ab") else 0.2 if name.startswith("a") else 0.9
        alpha = min(1 - 1 / 10, rate)
        torch.testing.assert_close(value, alpha * before[name] + (1 - alpha) * dict(model.named_parameters())[name])
    with pytest.raises(ValueError, match="matches no parameter"):
        EMATeacher(model, 0.9, {"heads.nothing": 0.5})
