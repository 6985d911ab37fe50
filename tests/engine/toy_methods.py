"""A toy method with an objective-owned discriminator, importable by spawned worker processes too."""

from torch import nn

from udaseg.adapt.adversarial import adversarial_losses
from udaseg.adapt.step import Need, Objective, OwnedOptimizer
from udaseg.config.schema import OptimConfig
from udaseg.methods import Method, register_method
from udaseg.methods.base import SupervisedSegmentation

SOURCE_PROBS = "toy_source_probs"


class ToyDiscriminator(Objective):
    """Output-space adversarial loss with a two-layer discriminator on softmax maps."""

    name = "toy_adversarial"

    def __init__(self, num_classes: int, weight: float = 0.1):
        super().__init__()
        self.weight = weight
        self.discriminator = nn.Sequential(nn.Conv2d(num_classes, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                           nn.Conv2d(4, 1, 3, stride=2, padding=1))

    def needs(self, iteration):
        return [Need("student", "source"), Need("student", "target")]

    def owned_optimizers(self):
        optim = OptimConfig(name="adamw", lr=1e-3, betas=[0.9, 0.99], weight_decay=0.0, warmup_iters=0, power=0.9)
        return {"discriminator": OwnedOptimizer(self.discriminator, optim)}

    def losses(self, ctx, group):
        if group == "source":
            ctx.state[SOURCE_PROBS] = ctx.student("source").logits.softmax(1).detach()
            return {}
        if group != "target":
            return {}
        target_probs = ctx.student("target").logits.softmax(1)
        generator, discriminator = adversarial_losses(self.discriminator, ctx.state[SOURCE_PROBS], target_probs)
        return {"adv_g": self.weight * generator, "adv_d": discriminator}


@register_method("toy_adversarial")
def build_toy_adversarial(cfg, segmentor):
    return Method([SupervisedSegmentation("source"), ToyDiscriminator(cfg.model.num_classes)], uses_target=True)


