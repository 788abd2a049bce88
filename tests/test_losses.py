"""The losses against the golden numbers (computed with the authors' reference implementation:
tests/golden/README.md), against a straightforward per-channel implementation, against finite
differences, and against the invariants the method relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from lightning_fl.labels import LabelSpace
from lightning_fl.losses import ConDistDiceLoss, KDLoss, MarginalDiceCELoss, PseudoLabelLoss, deep_supervision_weights
from tests.helpers.reference_losses import condist_loss_loop, marginal_loss_loop

GOLDEN_FILE = Path(__file__).parent / "golden" / "losses.pt"
GOLDEN = torch.load(GOLDEN_FILE)["cases"]
SPECIFICATION_GOLDEN = Path(__file__).resolve().parent.parent.parent / "shared" / "golden" / "losses.pt"


def test_the_golden_numbers_are_those_of_the_specification():
    """The project's copy is the file that comes with the method's specification, unchanged."""
    if not SPECIFICATION_GOLDEN.is_file():
        pytest.skip(
            f"the specification's golden file sits beside the development checkout only ({SPECIFICATION_GOLDEN})"
        )
    assert GOLDEN_FILE.read_bytes() == SPECIFICATION_GOLDEN.read_bytes()


def _grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def _assert_close(value, grad, ref_value, ref_grad) -> None:
    torch.testing.assert_close(value, torch.as_tensor(ref_value, dtype=value.dtype), rtol=1e-5, atol=1e-6)
    # relative to the largest gradient entry; a float32 floor for the near-zero gradients of a
    # single-group ConDist, where every conditional probability is ≈ 1
    assert (grad - ref_grad).abs().max() <= 1e-3 * ref_grad.abs().max() + 1e-8


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
@pytest.mark.parametrize("ce,key", [("official", "marginal_official"), ("marginal", "marginal_logmarginal")])
def test_marginal_matches_golden(case, ce, key):
    loss = MarginalDiceCELoss(case["foreground"], ce=ce)
    value, grad = _grad(lambda s: loss(s, case["label"]), case["student"])
    _assert_close(value, grad, case[key], case[f"{key}_grad"])


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_condist_matches_golden(case):
    loss = ConDistDiceLoss(case["num_classes"], case["foreground"], case["background"], case["temperature"])
    value, grad = _grad(lambda s: loss(s, case["teacher"], case["label"]), case["student"])
    _assert_close(value, grad, case["condist"], case["condist_grad"])


def _random_case(seed: int, num_classes: int, foreground: list[int], spatial: tuple[int, ...], scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, num_classes, *spatial, generator=g) * scale
    teacher = torch.randn(2, num_classes, *spatial, generator=g) * scale
    values = torch.tensor([0] + foreground)
    label = values[torch.randint(len(values), (2, 1, *spatial), generator=g)]
    return student, teacher, label


# label spaces beyond the paper's: other class counts, non-contiguous foregrounds, 2D inputs,
# other temperatures, saturated logits
CASES = [
    dict(num_classes=8, foreground=[1, 2], background=[0, 3, [4, 5], [6, 7]], spatial=(6, 5, 4), t=2.0, scale=3.0),
    dict(num_classes=8, foreground=[3], background=[0, [1, 2], [4, 5], [6, 7]], spatial=(7, 9), t=1.0, scale=3.0),
    dict(num_classes=5, foreground=[2, 4], background=[[0], [1, 3]], spatial=(5, 4, 3), t=0.5, scale=3.0),
    dict(num_classes=4, foreground=[1, 2, 3], background=[0], spatial=(8, 8), t=4.0, scale=3.0),
    dict(num_classes=8, foreground=[1, 3, 4, 6], background=[0, 2, 5, 7], spatial=(4, 4, 4), t=2.0, scale=3.0),
    dict(num_classes=8, foreground=[6, 7], background=[0, [1, 2], 3, [4, 5]], spatial=(5, 5, 3), t=2.0, scale=60.0),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"C{c['num_classes']}-fg{c['foreground']}-{len(c['spatial'])}d-x{c['scale']}"
)
@pytest.mark.parametrize("ce", ["official", "marginal"])
def test_marginal_matches_per_channel_reference(case, ce):
    student, _, label = _random_case(1, case["num_classes"], case["foreground"], case["spatial"], case["scale"])
    value, grad = _grad(lambda s: MarginalDiceCELoss(case["foreground"], ce=ce)(s, label), student)
    ref_value, ref_grad = _grad(lambda s: marginal_loss_loop(s, label, case["foreground"], ce), student)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    _assert_close(value, grad, ref_value, ref_grad)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"C{c['num_classes']}-fg{c['foreground']}-{len(c['spatial'])}d-x{c['scale']}"
)
def test_condist_matches_per_channel_reference(case):
    student, teacher, label = _random_case(2, case["num_classes"], case["foreground"], case["spatial"], case["scale"])
    loss = ConDistDiceLoss(case["num_classes"], case["foreground"], case["background"], case["t"])
    value, grad = _grad(lambda s: loss(s, teacher, label), student)
    ref = lambda s: condist_loss_loop(s, teacher, label, case["foreground"], case["background"], case["t"])  # noqa: E731
    ref_value, ref_grad = _grad(ref, student)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    _assert_close(value, grad, ref_value, ref_grad)


@pytest.mark.parametrize("ce", ["official", "marginal"])
def test_analytic_gradients_pass_gradcheck(ce):
    student, teacher, label = _random_case(3, 6, [2, 5], (3, 3, 2))
    student, teacher = student.double(), teacher.double()
    marginal = MarginalDiceCELoss([2, 5], ce=ce)
    condist = ConDistDiceLoss(6, [2, 5], [0, [1], [3, 4]], temperature=1.5)
    heads = torch.stack([student, student.flip(-1)], dim=1)
    assert torch.autograd.gradcheck(lambda s: marginal.per_head(s, label), (heads.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda s: condist(s, teacher, label), (student.requires_grad_(),))


def test_empty_condist_mask_gives_one_and_no_gradient():
    # every voxel is local foreground in the label: nothing to distil
    student, teacher, _ = _random_case(4, 8, [1, 2], (4, 4, 4))
    label = torch.ones(2, 1, 4, 4, 4, dtype=torch.long)
    value, grad = _grad(lambda s: ConDistDiceLoss(8, [1, 2], [0, 3, [4, 5], [6, 7]])(s, teacher, label), student)
    assert value.item() == 1.0
    assert torch.count_nonzero(grad) == 0


def test_condist_is_minimal_when_student_equals_confident_teacher():
    """With a confident teacher the conditional probabilities are near one-hot; then the student
    that copies the teacher is the minimum (loss ≈ 0) and any perturbation moves away from it."""
    g = torch.Generator().manual_seed(5)
    winner = torch.randint(8, (2, 6, 6, 4), generator=g)
    teacher = 50.0 * torch.nn.functional.one_hot(winner, 8).movedim(-1, 1).float()
    label = torch.where(winner == 1, 1, 0).unsqueeze(1)
    loss = ConDistDiceLoss(8, [1, 2], [0, 3, [4, 5], [6, 7]])
    at_teacher = loss(teacher, teacher, label)
    assert at_teacher.item() < 1e-5
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perturbed = teacher + 20.0 * torch.randn(teacher.shape, generator=g)
        assert loss(perturbed, teacher, label) > at_teacher
    _, grad = _grad(lambda s: loss(s, teacher, label), teacher)
    assert grad.abs().max() < 1e-4


def test_fully_labelled_site_marginal_equals_plain_dice_ce():
    """When a site labels every class nothing is merged: the marginal loss is plain Dice + CE."""
    student, _, label = _random_case(6, 5, [1, 2, 3, 4], (6, 5, 4))
    settings = dict(include_background=True, to_onehot_y=True, softmax=True, batch=True, smooth_nr=0.0, smooth_dr=1e-5)
    marginal = MarginalDiceCELoss([1, 2, 3, 4], ce="marginal")(student, label)
    torch.testing.assert_close(marginal, DiceCELoss(**settings)(student, label))
    official = MarginalDiceCELoss([1, 2, 3, 4], ce="official")(student, label)
    prob = torch.softmax(student, 1)
    plain = DiceLoss(**settings)(student, label) + torch.nn.functional.cross_entropy(prob, label[:, 0])
    torch.testing.assert_close(official, plain)


def test_deep_supervision_weights_are_the_specs():
    torch.testing.assert_close(
        deep_supervision_weights(4), torch.tensor([0.5333, 0.2667, 0.1333, 0.0667]), atol=1e-4, rtol=0
    )
    assert deep_supervision_weights(1).tolist() == [1.0]


def test_per_head_equals_each_head_alone():
    student, _, label = _random_case(7, 8, [4, 5], (6, 6, 4))
    heads = torch.stack([student, 0.5 * student, -student], dim=1)
    loss = MarginalDiceCELoss([4, 5])
    expected = torch.stack([loss(heads[:, h], label) for h in range(3)])
    torch.testing.assert_close(loss.per_head(heads, label), expected)


def test_label_space_groups_reproduce_golden_groups():
    labels = LabelSpace(
        ("background", "liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor"),
        {"liver_tumor": "liver", "pancreas_tumor": "pancreas", "kidney_tumor": "kidney"},
    )
    for case in GOLDEN:
        expected = [[g] if isinstance(g, int) else list(g) for g in case["background"]]
        assert labels.background_groups(case["foreground"]) == expected


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="ce must be"):
        MarginalDiceCELoss([1], ce="focal")
    with pytest.raises(ValueError, match="foreground"):
        MarginalDiceCELoss([0, 1])
    with pytest.raises(ValueError, match="disjoint"):
        ConDistDiceLoss(4, [1], [0, [1, 2]])
    with pytest.raises(ValueError, match="temperature"):
        ConDistDiceLoss(4, [1], [0, 2, 3], temperature=0.0)
    with pytest.raises(ValueError, match="label shape"):
        MarginalDiceCELoss([1])(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 5, dtype=torch.long))


@pytest.mark.parametrize("value", [-1, 8, 9])
def test_a_label_value_no_class_has_is_refused_not_clamped_into_a_class(value):
    """With data.check_before_fit=false nothing read the files first: a 9 among 8 classes must stop
    the site's step (the site is dropped, saying why), not train as class 7 or background."""
    logits = torch.randn(1, 8, 4, 4, 3)
    label = torch.zeros(1, 1, 4, 4, 3, dtype=torch.long)
    label[0, 0, 1, 2, 0] = value
    message = f"label values must be class indices 0–7, got values from {min(value, 0)} to {max(value, 0)}"
    with pytest.raises(ValueError, match=message):
        MarginalDiceCELoss([1, 2])(logits, label)
    with pytest.raises(ValueError, match=message):
        ConDistDiceLoss(8, [1, 2], [0, 3, [4, 5], [6, 7]])(logits, logits, label)


# ---------------------------------------------------------------- the baselines' teacher terms
def test_kd_distils_the_teachers_tempered_softmax_at_every_voxel_whatever_the_label():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, 4, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, 3, generator=generator)
    label = torch.randint(0, 5, (2, 1, 4, 4, 3), generator=generator)
    kd = KDLoss(temperature=2.0)
    value = kd(student, teacher, label)
    target = torch.softmax(teacher / 2.0, dim=1)
    expected = (target * (target.log() - torch.log_softmax(student / 2.0, dim=1))).sum(1).mean() * 4.0
    torch.testing.assert_close(value, expected)
    assert value == kd(student, teacher, torch.zeros_like(label))  # no mask: the label plays no part
    value.backward()
    voxels = student.numel() // 5
    # T² · d KL / d s = T · (softmax(s/T) − softmax(t/T)) per voxel, over the voxels' mean
    torch.testing.assert_close(student.grad, 2.0 * (torch.softmax(student / 2.0, 1) - target) / voxels)
    assert (student.grad.abs().sum(1) > 0).all()  # every voxel, labelled or not
    assert kd(teacher, teacher, label) == pytest.approx(0.0, abs=1e-6)


def test_pseudo_labels_never_overwrite_what_the_site_labels():
    """Site labelling class 1 of [bg, 1, 2, 3]. Voxels: (0) label 1, teacher sure of 2; (1) label bg,
    teacher sure of 2; (2) label bg, teacher sure of 1 (a local class: its background is true);
    (3) label bg, teacher sure of bg; (4) label bg, teacher unsure of 3; (5) label bg, teacher sure of 3."""
    loss = PseudoLabelLoss(4, foreground=[1], threshold=0.6)
    label = torch.tensor([1, 0, 0, 0, 0, 0]).view(1, 1, 6)
    teacher = torch.full((1, 4, 6), -5.0)
    for voxel, cls in enumerate((2, 2, 1, 0, 3, 3)):
        teacher[0, cls, voxel] = 5.0
    teacher[0, :, 4] = torch.tensor([0.0, 0.0, 0.0, 0.3])  # softmax of class 3 about 0.3: below threshold
    assert loss.targets(teacher, label).tolist() == [[-1, 2, -1, -1, -1, 3]]
    student = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = loss(student, teacher, label)
    expected = -(torch.log_softmax(student, 1)[0, 2, 1] + torch.log_softmax(student, 1)[0, 3, 5]) / 2
    torch.testing.assert_close(value, expected)
    value.backward()
    assert (student.grad.abs().sum(1)[0] > 0).tolist() == [False, True, False, False, False, True]
    nothing = loss(student, teacher, torch.ones_like(label))  # every voxel labelled: no pseudo-label
    assert nothing.item() == 0.0 and nothing.requires_grad
