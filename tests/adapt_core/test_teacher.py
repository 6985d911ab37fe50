import torch
from torch import nn

from udaseg.adapt.teacher import EMATeacher, disable_dropout


class DropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1) > self.drop_prob).float()
        return x * keep / (1 - self.drop_prob)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.dropout = nn.Dropout(0.5)
        self.drop_path = DropPath(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.drop_path(self.dropout(self.bn(self.linear(x)))))


def _set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_first_update_copies_student():
    student = TinyNet()
    teacher = EMATeacher(student)
    _set_params(student, 3.0)
    teacher.update(0)
    for p in teacher.module.parameters():
        assert torch.all(p == 3.0)
        assert not p.requires_grad


def test_alpha_ramp_matches_hand_computation():
    student = TinyNet()
    teacher = EMATeacher(student, alpha_max=0.999)
    _set_params(student, 1.0)
    teacher.update(0)  # teacher = 1
    _set_params(student, 2.0)
    teacher.update(1)  # alpha = 1 - 1/2 = 0.5 -> 0.5*1 + 0.5*2 = 1.5
    _set_params(student, 4.0)
    teacher.update(2)  # alpha = 2/3 -> 2/3*1.5 + 1/3*4 = 7/3
    expected = 7.0 / 3.0
    for p in teacher.module.parameters():
        assert torch.allclose(p, torch.full_like(p, expected), atol=1e-6)
    assert abs(teacher.last_alpha - 2.0 / 3.0) < 1e-12
    assert teacher.alpha(999) == 0.999
    assert teacher.alpha(5000) == 0.999
    assert abs(teacher.alpha(10) - (1 - 1 / 11)) < 1e-12


def test_teacher_bn_uses_batch_statistics_and_no_dropout():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = EMATeacher(student)
    teacher.update(0)
    assert teacher.module.training and teacher.module.bn.training
    assert not teacher.module.dropout.training and not teacher.module.drop_path.training
    x = torch.randn(8, 3)
    out1 = teacher(x)
    out2 = teacher(x)
    assert torch.equal(out1, out2)  # no dropout randomness
    assert not out1.requires_grad
    # Batch statistics: the reference is the net with BN in train mode and dropout off.
    reference = TinyNet()
    reference.load_state_dict(student.state_dict())
    reference.train()
    reference.dropout.p = 0.0
    reference.drop_path.drop_prob = 0.0
    with torch.no_grad():
        expected = reference(x)
    assert torch.allclose(out1, expected, atol=1e-6)
    # A later .train() call does not bring dropout back.
    teacher.module.train()
    assert torch.equal(teacher(x), out1)


def test_disable_dropout_finds_all_kinds():
    class SomeDropPathVariant(nn.Module):
        def forward(self, x):
            return x

    net = nn.Sequential(nn.Dropout2d(0.3), DropPath(0.2), SomeDropPathVariant(), nn.BatchNorm2d(2))
    net.train()
    found = disable_dropout(net)
    assert len(found) == 3
    assert net[0].p == 0.0 and net[1].drop_prob == 0.0
    assert net[3].training


def test_state_dict_round_trip():
    student = TinyNet()
    teacher = EMATeacher(student)
    _set_params(student, 0.25)
    teacher.update(0)
    other = EMATeacher(TinyNet())
    other.load_state_dict(teacher.state_dict())
    for a, b in zip(teacher.module.parameters(), other.module.parameters()):
        assert torch.equal(a, b) and not b.requires_grad


def test_teacher_running_statistics_follow_the_student_not_its_own_forwards():
    import torch
    from torch import nn

    from udaseg.adapt.teacher import EMATeacher

    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = EMATeacher(student, alpha_max=0.5)
    teacher.update(0)
    student(torch.randn(8, 3, 5, 5) * 3 + 2)  # moves the student's running statistics
    before = teacher.module[1].running_mean.clone()
    teacher(torch.randn(8, 3, 5, 5) + 10)  # a teacher forward (train-mode BN) must not move them
    assert torch.equal(teacher.module[1].running_mean, before)
    teacher.update(1)  # alpha_1 = min(1 - 1/2, 0.5) = 0.5
    expected = 0.5 * before + 0.5 * student[1].running_mean
    assert torch.allclose(teacher.module[1].running_mean, expected)
    # the teacher still normalises with the batch it sees (train mode), as the official code does
    x = torch.randn(8, 3, 5, 5) + 10
    out = teacher(x)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), teacher.module[1].bias, atol=1e-5)
