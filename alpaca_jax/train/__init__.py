"""Training: the train-state pytree, the pure train steps (SFT and preference), the optimizer, and the loops."""

from alpaca_jax.train.loss import chunked_loss_rule, chunked_token_cross_entropy
from alpaca_jax.train.entry import train
from alpaca_jax.train.step_loop import TrainingError, TrainResult
from alpaca_jax.train.metrics import read_metrics
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.preemption import Interrupted
from alpaca_jax.train.preference_loop import train_preference
from alpaca_jax.train.preference_step import preference_train_step
from alpaca_jax.train.state import TrainState, create_train_state, state_shardings
from alpaca_jax.train.step import loss_and_grads, summed_loss, token_cross_entropy, train_step

__all__ = ["train", "TrainingError", "Interrupted", "TrainResult", "read_metrics", "learning_rate_schedule",
           "make_optimizer", "TrainState", "create_train_state", "state_shardings",
           "loss_and_grads", "summed_loss", "token_cross_entropy", "train_step",
           "chunked_token_cross_entropy", "chunked_loss_rule", "train_preference", "preference_train_step"]
