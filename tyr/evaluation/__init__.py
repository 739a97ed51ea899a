"""Model quality: held-out perplexity, KL to the dense model, zero-shot BIG-bench multiple choice, result report.

- language_modeling.py: perplexity, kl_to_reference, compare_to_reference (compare_all_to_reference: several models,
  one reference pass)
- multiple_choice.py + bigbench.py: score_choices, evaluate_task on BIG-bench task files
- run.py: evaluate_model, one model's whole evaluation (evaluate_models: several at once); report.py: EvalResult
  (JSON, text, Markdown)
- cli.py: `tyr eval`
"""
