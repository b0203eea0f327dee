"""How sure an accuracy measured on calibration samples is: the one-sided Clopper-Pearson lower bound."""

from __future__ import annotations

from distree.errors import DistreeError


def clopper_pearson_lower(successes: int, trials: int, confidence: float) -> float:
    """The lower bound p_lo with P(Binomial(trials, p_lo) >= successes) = 1 - confidence."""
    if not 0.0 < confidence < 1.0:
        raise DistreeError(f"confidence {confidence} must be strictly between 0 and 1, e.g. 0.95")
    if trials == 0 or successes <= 0:
        return 0.0
    from scipy.stats import beta    # SciPy's import costs ~1 s: only planning and calibration reports need it

    return float(beta.ppf(1.0 - confidence, successes, trials - successes + 1))
