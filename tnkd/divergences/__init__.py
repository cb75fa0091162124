"""Distillation divergences D(P || Q) between the teacher's and the student's softened outputs.

P = softmax(v / T) from the teacher's logits v, Q = softmax(z / T) from the student's logits z.
Every divergence here

* takes **logits** and a temperature and works in log-space (``log_softmax``, ``logsumexp``),
  so nothing underflows at low temperature or with many classes;
* sums over classes (the last dimension) and returns the **batch mean** (the mean over all
  leading dimensions), as Hinton et al.'s ``batchmean`` KL does;
* treats teacher zeros (logits of ``-inf``) by its convention (0 log 0 = 0), never NaN;
* has a gradient ``scale(T)`` so that the distillation term keeps its size as T changes: T^2
  for KL (Hinton et al. 2015), T^2 / alpha for Renyi, and for the others the factor that makes
  their gradient match KL's at high temperature;
* comes as a functional twin (``renyi_divergence(...)``) and a module (``RenyiDivergence``)
  registered by name (``DIVERGENCES``), buildable from YAML as ``divergence: renyi``,
  ``divergence: {name: renyi, alpha: 0.5}`` or a ``class_path``;
* takes ``standardize: true`` (every module): logit standardization (Sun et al. 2024), each
  sample's logits z-scored before the temperature (:func:`standardize_logits`).

Besides the divergences proper, the registry holds decoupled KD (``dkd``, Zhao et al. 2022),
which weighs the target-class and non-target-class parts of KL separately and so needs the
labels (:class:`DecoupledKD`).

The package: :mod:`~tnkd.divergences.logits` (input checks, log-probabilities, logit
standardization), :mod:`~tnkd.divergences.log_ratios` (accurate log-ratios and the
cancellation-free terms), :mod:`~tnkd.divergences.functional` (the functional twins) and
:mod:`~tnkd.divergences.modules` (the modules and their registry). Everything public is
importable from ``tnkd.divergences``.
"""

from tnkd.divergences.functional import (
    cross_entropy_between,
    decoupled_kd,
    decoupled_kd_parts,
    entropy,
    hellinger_distance,
    jensen_shannon_divergence,
    kl_divergence,
    renyi_divergence,
    reverse_kl_divergence,
    skew_kl_divergence,
    total_variation_distance,
)
from tnkd.divergences.log_ratios import (
    LogRatios,
    log_ratios,
)
from tnkd.divergences.logits import (
    check_alpha,
    check_temperature,
    log_probs,
    standardize_logits,
)
from tnkd.divergences.modules import (
    DIVERGENCES,
    DecoupledKD,
    Divergence,
    HellingerDistance,
    JensenShannonDivergence,
    KLDivergence,
    RenyiDivergence,
    ReverseKLDivergence,
    SkewKLDivergence,
    TotalVariationDistance,
    build_divergence,
)

__all__ = [
    "DIVERGENCES",
    "DecoupledKD",
    "Divergence",
    "HellingerDistance",
    "JensenShannonDivergence",
    "KLDivergence",
    "LogRatios",
    "RenyiDivergence",
    "ReverseKLDivergence",
    "SkewKLDivergence",
    "TotalVariationDistance",
    "build_divergence",
    "check_alpha",
    "check_temperature",
    "cross_entropy_between",
    "decoupled_kd",
    "decoupled_kd_parts",
    "entropy",
    "hellinger_distance",
    "jensen_shannon_divergence",
    "kl_divergence",
    "log_probs",
    "log_ratios",
    "renyi_divergence",
    "reverse_kl_divergence",
    "skew_kl_divergence",
    "standardize_logits",
    "total_variation_distance",
]
