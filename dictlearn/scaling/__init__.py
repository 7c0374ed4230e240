"""Scaling laws for sparse autoencoders: forms, robust fits with uncertainty, and plans.

    from dictlearn.scaling import ComputeModel, FitOptions, PlanOptions, fit_law
    result = fit_law('chinchilla', {'n_latents': n, 'tokens': d}, fvu, target='fvu',
                     options=FitOptions(holdout=0.2),
                     plan=PlanOptions(compute=ComputeModel('sae', d_model=768)))
    print(result.report())

CLI: `python -m dictlearn.scaling fit RESULTS.jsonl --form chinchilla --holdout 0.2 --plots DIR`.
Modules: laws (forms, compute, compute-optimal calculus), optimize (the estimator),
fit (bootstrap, validation, plan), report, plot, records (result tables), sweep.
"""
from dictlearn.scaling.fit import (DEFAULT_TARGETS, FitOptions, FitResult, PlanOptions, PointFit,
                                   bootstrap_spreads, estimate, fit_law, holdout_largest,
                                   validate)
from dictlearn.scaling.laws import (CHINCHILLA, LAWS, OPENAI, POWER, ComputeModel, Law,
                                    compute_optimal, frontier_exponents, get_law,
                                    lm_training_flops, optimal_tokens_for_size, predict,
                                    sae_training_flops)

__all__ = [
    'CHINCHILLA', 'ComputeModel', 'DEFAULT_TARGETS', 'FitOptions', 'FitResult', 'LAWS', 'Law',
    'OPENAI', 'POWER', 'PlanOptions', 'PointFit', 'bootstrap_spreads', 'compute_optimal',
    'estimate', 'fit_law',
    'frontier_exponents', 'get_law', 'holdout_largest', 'lm_training_flops',
    'optimal_tokens_for_size', 'predict', 'sae_training_flops', 'validate',
]
