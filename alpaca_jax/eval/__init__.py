"""Evaluation: held-out perplexity, ROUGE-L, the pairwise LLM judge, and the results table.

The held-out loss during training lives with training (alpaca_jax/train/evaluate.py); this
package scores finished runs (`alpaca-jax eval`) and reuses that computation for perplexity.

lm-evaluation-harness tasks (`eval --tasks`) need the optional `lm_eval` package, so their
modules are not imported here: `eval.tasks` (finding tasks), `eval.harness` (`task_scores`,
`run_tasks`) and `eval.lm_eval_backend` (`AlpacaJaxLM`, our model as lm-eval's backend).
"""

from alpaca_jax.eval.config import JudgeConfig, PairwiseConfig, load_judge_config
from alpaca_jax.eval.dataset import EvalItem, load_eval_file
from alpaca_jax.eval.judge import JudgeError, Matchup, judge_matchups, open_judge, parse_verdict
from alpaca_jax.eval.loss_curves import loss_curves_svg
from alpaca_jax.eval.outputs import read_model_outputs, write_model_outputs
from alpaca_jax.eval.report import markdown_table
from alpaca_jax.eval.report_page import write_report_page
from alpaca_jax.eval.rouge import mean_rouge_l, rouge_l
from alpaca_jax.eval.runner import REFERENCES, EvalError, evaluate
from alpaca_jax.eval.stats import PairVerdicts, bootstrap_interval, summarize

__all__ = ["JudgeConfig", "PairwiseConfig", "load_judge_config", "EvalItem", "load_eval_file",
           "JudgeError", "Matchup", "judge_matchups", "open_judge", "parse_verdict",
           "read_model_outputs", "write_model_outputs", "markdown_table", "write_report_page",
           "loss_curves_svg", "mean_rouge_l", "rouge_l",
           "REFERENCES", "EvalError", "evaluate", "PairVerdicts", "bootstrap_interval", "summarize"]
