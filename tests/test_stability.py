"""fp16 loss scaling and rollbacks: the scale recovers after it falls, overflows are not bad steps, and a
rollback keeps the scale the run has learned."""
import pytest

from lm.config.schema import StabilityConfig
from lm.training.stability import GROW_AFTER, Stability
from lm.training.trainer import Trainer, TrainingError
from tests.test_trust_training import config, poison


def test_the_scale_grows_again_after_falling_to_one():
    st = Stability(StabilityConfig(loss_scale=65536.0, rollback_after=5), fp16=True)
    for _ in range(17):
        st.record(st.verdict(2.0, float("inf")), 2.0)
    assert st.loss_scale == 1.0
    for _ in range(5000):
        st.record(st.verdict(2.0, 1.0), 2.0)
    assert st.loss_scale == 2.0 ** (5000 // GROW_AFTER)


def test_overflows_do_not_count_toward_a_rollback_until_the_scale_is_at_its_floor():
    st = Stability(StabilityConfig(loss_scale=2.0 ** 10, rollback_after=5), fp16=True)
    for _ in range(10):  # ten halvings: 1024 -> 1
        st.record(st.verdict(2.0, float("inf")), 2.0)
        assert not st.must_roll_back
    assert st.loss_scale == 1.0 and st.bad_in_a_row == 0 and st.skipped == 10
    for _ in range(5):
        st.record(st.verdict(2.0, float("inf")), 2.0)
    assert st.must_roll_back and "float16 gradients overflow" in st.why_unrecoverable()


def test_a_nan_loss_is_a_bad_step_in_any_precision():
    st = Stability(StabilityConfig(rollback_after=2), fp16=True)
    st.record(st.verdict(float("nan"), float("nan")), float("nan"))
    st.record(st.verdict(float("nan"), float("nan")), float("nan"))
    assert st.must_roll_back and st.loss_scale == 65536.0 and "optim.lr" in st.why_unrecoverable()


def test_state_carries_the_good_step_count_for_an_exact_resume():
    st = Stability(StabilityConfig(), fp16=True)
    for _ in range(GROW_AFTER - 1):
        st.record(None, 2.0)
    again = Stability(StabilityConfig(), fp16=True)
    again.load_state_dict(st.state_dict())
    st.record(None, 2.0)
    again.record(None, 2.0)
    assert st.loss_scale == again.loss_scale == 2 * 65536.0


def test_a_rollback_keeps_the_learned_loss_scale(char_dataset, tmp_path):
    trainer = Trainer(config(char_dataset, tmp_path / "r", "train.max_steps=4", "train.eval_interval=2",
                             "stability.rollback_after=1"))
    trainer.stability.fp16, trainer.stability.loss_scale = True, 1024.0  # as a float16 run would hold it
    trainer.run(stop_at_step=2)  # a checkpoint at step 2 with scale 1024
    trainer.stability.loss_scale = 8.0  # halved since by overflows
    poison(trainer, [2])
    trainer.cfg.train.max_steps = 3
    trainer.run()
    assert trainer.stability.rollbacks == 1 and trainer.stability.loss_scale == 8.0
    trainer.close()


def test_no_checkpoint_to_roll_back_to_names_the_real_cause(char_dataset, tmp_path):
    trainer = Trainer(config(char_dataset, tmp_path / "n", "train.max_steps=4", "train.eval_interval=100",
                             "stability.rollback_after=1"))
    poison(trainer, [0])
    with pytest.raises(TrainingError, match="lower optim.lr"):
        trainer.run()
    trainer.close()
