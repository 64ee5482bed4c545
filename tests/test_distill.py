"""Distillation ([distill]): the loss, its gradient, the teacher's tokenizer check, and runs on 1 and 2
processes."""
import pytest
import torch
import torch.nn.functional as F

from data_prep import DataError, prepare
from lm.config.load import load_config
from lm.objectives.teacher import distillation_loss
from lm.training.trainer import Trainer
from tests.conftest import TRAIN_BASE as BASE, losses, train

TEACHER = ["model.n_layer=2", "model.n_head=2", "model.n_embd=48"]
STUDENT = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"]


def test_alpha_zero_is_the_cross_entropy():
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    assert torch.equal(distillation_loss(s, t, y, 2.0, 0.0), F.cross_entropy(s.view(-1, 11), y.view(-1)))


def test_the_soft_term_gradient_matches_its_closed_form():
    """d/ds [T^2 KL(softmax(t/T) || softmax(s/T))] = T (softmax(s/T) - softmax(t/T)) per token, over N tokens."""
    torch.manual_seed(0)
    s = torch.randn(3, 4, 13, dtype=torch.float64, requires_grad=True)
    t, y, T = torch.randn(3, 4, 13, dtype=torch.float64), torch.randint(0, 13, (3, 4)), 3.0
    y[0, 0] = -100  # an ignored target is out of both terms
    (distillation_loss(s, t, y, T, 1.0) - 0.0).backward()
    keep = (y != -100)[..., None].double()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) * keep / keep.sum()
    assert torch.allclose(s.grad, expected, atol=1e-7)  # the loss computes in fp32
    # and the KL itself against a brute-force loop
    p, q = torch.softmax(t / T, -1), torch.softmax(s.detach() / T, -1)
    brute = sum((p[i, j] * (p[i, j] / q[i, j]).log()).sum() for i in range(3) for j in range(4) if y[i, j] != -100)
    assert torch.isclose(distillation_loss(s.detach(), t, y, T, 1.0).double(), T * T * brute / 11, rtol=1e-6)


@pytest.fixture(scope="module")
def teacher(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    prepare([str(tiny_corpus)], root / "char", tokenizer="char", show_progress=False)
    prepare([str(tiny_corpus)], root / "bpe", tokenizer="bpe", vocab_size=300, show_progress=False)
    train(*TEACHER, f"data.dir={root / 'char'}", f"train.out_dir={root / 'teacher'}", "train.batch_size=4",
          "train.max_steps=3", "train.eval_interval=3")
    return root


def student(root, out, *extra):
    return load_config(None, [*BASE, *STUDENT, f"data.dir={root / 'char'}", f"train.out_dir={out}",
                              "train.batch_size=4", "train.max_steps=3", "train.eval_interval=3", *extra])


@pytest.mark.slow
def test_alpha_zero_trains_like_plain_training(teacher, tmp_path):
    plain = Trainer(student(teacher, tmp_path / "plain")).run()
    distilled = Trainer(student(teacher, tmp_path / "d0", f"distill.teacher={teacher / 'teacher'}",
                                "distill.alpha=0")).run()
    assert distilled["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    assert distilled["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(teacher, tmp_path):
    cfg = load_config(None, [*BASE, *STUDENT, f"data.dir={teacher / 'bpe'}", f"train.out_dir={tmp_path / 's'}",
                             f"distill.teacher={teacher / 'teacher'}"])
    with pytest.raises(DataError, match=r"teacher's tokenizer .*chars.json.* student's .*tokenizer.json"):
        Trainer(cfg)


@pytest.mark.slow
def test_distillation_on_two_processes_matches_one(teacher, tmp_path):
    common = [*STUDENT, f"data.dir={teacher / 'char'}", f"distill.teacher={teacher / 'teacher'}", "distill.alpha=0.7",
              "distill.temperature=2", "train.eval_interval=3", "train.max_steps=3"]
    train(*common, f"train.out_dir={tmp_path / 'one'}", "train.batch_size=4")
    train(*common, f"train.out_dir={tmp_path / 'two'}", "train.batch_size=2", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


@pytest.mark.slow
def test_a_hugging_face_teacher_with_our_tokenizer_teaches(cli, teacher, tmp_path):
    r = cli("-m", "lm.export", teacher / "teacher", "--format", "hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    trainer = Trainer(student(teacher, tmp_path / "s", f"distill.teacher=hf:{tmp_path / 'hf'}", "train.max_steps=1"))
    x = torch.randint(0, trainer.cfg.model.vocab_size, (1, 16))
    from lm.interop.export import load

    _, ours = load(teacher / "teacher")
    with torch.no_grad():  # the HF directory's weights arrived as the teacher
        assert torch.allclose(trainer.objective.teacher(x)[0], ours(x)[0], atol=1e-5)
    trainer.run()
