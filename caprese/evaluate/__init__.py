"""Evaluation: math accuracy, language retention, fidelity to the original model, reports.

    variant.py         Variant: full, a method alone, or a Caprese adapter; applied()
    tasks.py           EvalTask and evaluate(): one task on one variant -> result JSON
    math.py            accuracy by generation (Wilson intervals, pass@k, lengths)
    checker.py         is a response's final answer the gold one (math-verify, bounded)
    language.py        XSum 1-shot ROUGE
    fidelity.py        KL / top-1 / perplexity against the original model; per-layer errors
    compare.py         paired drops and recovery between variants
    report.py          markdown tables and plots from result files
    lm_eval_bridge.py  lm-evaluation-harness tasks with Caprese's phases intact
"""
