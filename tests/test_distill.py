from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_timm_vit

from pathsearch.model import PathEnsembleViT, distillation_loss
from pathsearch.paths import DistillConfig, PathConfig


def test_distillation_loss_matches_the_design_note_formula():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 5, generator=gen)
    students = [torch.randn(8, 5, generator=gen) for _ in range(2)]
    alpha, temp = 0.7, 3.0
    expected = 0.0
    for s in students:
        p = F.softmax(teacher / temp, -1)
        q = F.softmax(s / temp, -1)
        expected += alpha * temp**2 * (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(distillation_loss(teacher, students, alpha, temp), expected, atol=1e-6)
    assert distillation_loss(teacher, students, 0.0, temp).item() == 0.0


def test_teacher_is_detached():
    teacher = torch.randn(4, 5, requires_grad=True)
    student = torch.randn(4, 5, requires_grad=True)
    distillation_loss(teacher, [student], 1.0, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_students_by_prefix_length_and_by_group():
    cfg = PathConfig(
        pruned=["attn.1"], distill=DistillConfig(alpha=1.0, temperature=2.0, students=[3, "mlp", "attn.1"])
    )
    model = PathEnsembleViT(tiny_timm_vit(), cfg).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        logits, students = model.forward_with_students(x)
        paths = model.forward_paths(x)
        scales = model.ensemble_scale
    assert torch.allclose(logits, model(x), atol=1e-5)
    # 'attn.1' alone is pruned -> that student has no kept path and is skipped.
    assert len(students) == 2
    prefix = paths[0] * scales[0] + paths[2] * scales[2]  # first 3 paths minus pruned attn.1
    mlp = sum(paths[i] * scales[i] for i in (2, 4, 6))
    assert torch.allclose(students[0], model.forward_head(prefix), atol=1e-5)
    assert torch.allclose(students[1], model.forward_head(mlp), atol=1e-5)


def test_distillation_trains_short_paths():
    cfg = PathConfig(distill=DistillConfig(alpha=1.0, temperature=2.0, students=[2]))
    model = PathEnsembleViT(tiny_timm_vit(), cfg)
    logits, students = model.forward_with_students(torch.randn(4, 3, 16, 16))
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + model.distillation_loss(logits, students)
    loss.backward()
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert loss.item() > F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).item()
