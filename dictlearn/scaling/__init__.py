"""Scaling laws for sparse autoencoders: forms, robust fits with uncertainty, and plans.

    from dictlearn.scaling import fit_law, ComputeModel
    result = fit_law('chinchilla', {'n_latents': n, 'tokens': d}, fvu,
                     compute=ComputeModel('sae', d_model=768), holdout=0.2)
    print(result.report())

CLI: `python -m dictlearn.scaling fit RESULTS.jsonl --form chinchilla --holdout 0.2 --plots DIR`.
"""
from dictlearn.scaling.fit import DEFAULT_TARGETS, FitResult, PointFit, estimate, fit_law
from dictlearn.scaling.laws import (CHINCHILLA, LAWS, OPENAI, POWER, ComputeModel, Law,
                                    compute_optimal, frontier_exponents, get_law,
                                    lm_training_flops, optimal_tokens_for_size, predict,
                                    sae_training_flops)

__all__ = [
    'CHINCHILLA', 'ComputeModel', 'DEFAULT_TARGETS', 'FitResult', 'LAWS', 'Law', 'OPENAI', 'POWER',
    'PointFit', 'compute_optimal', 'estimate', 'fit_law', 'frontier_exponents', 'get_law',
    'lm_training_flops', 'optimal_tokens_for_size', 'predict', 'sae_training_flops',
]
