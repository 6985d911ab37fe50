"""The evaluator: metrics of a model's predictions, and the Dark Zurich class-prior re-weighting."""

import torch

from udaseg.config.schema import EvalConfig
from udaseg.evaluation.evaluator import evaluate
from udaseg.evaluation.metrics import ConfusionMatrix
from udaseg.methods.sepico import dark_zurich_class_weights
from udaseg.models import build_model


class Items(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(3, 3, 32, 48, generator=gen)
        self.labels = torch.randint(0, 19, (3, 32, 48), generator=gen)

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _reference(model, data, weights=None):
    matrix = ConfusionMatrix(19)
    with torch.no_grad():
        for i in range(len(data)):
            logits = model(data[i]["image"][None]).logits
            logits = torch.nn.functional.interpolate(logits, size=(32, 48), mode="bilinear", align_corners=False)
            scores = logits if weights is None else torch.softmax(logits, 1) * weights.view(1, -1, 1, 1)
            matrix.update(scores.argmax(1), data[i]["label"][None])
    return matrix


def test_evaluate_matches_a_plain_loop_with_and_without_class_prior():
    torch.manual_seed(0)
    model = build_model("daformer_tiny", 19).eval()
    data = Items()
    plain = evaluate(model, data, EvalConfig(), 19, torch.device("cpu"), progress=False)
    ref = _reference(model, data)
    assert plain["miou"] == ref.miou()
    weights = dark_zurich_class_weights(0.16)
    weighted = evaluate(model, data, EvalConfig(class_prior_scale=0.16), 19, torch.device("cpu"), progress=False)
    ref_weighted = _reference(model, data, weights)
    assert weighted["miou"] == ref_weighted.miou()
    assert not torch.equal(ref.matrix, ref_weighted.matrix)
