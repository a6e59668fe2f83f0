"""Gate saturation (Karpathy, Johnson & Fei-Fei 2015, Figure 3): per layer and unit, the fraction of
steps a gate is left-saturated (< 0.1, nearly closed) and right-saturated (> 0.9, nearly open)."""

from __future__ import annotations

from torch import Tensor

LEFT, RIGHT = 0.1, 0.9


def saturation(acts: dict[str, Tensor], gate_names: tuple[str, ...]) -> dict[str, dict]:
    """gate name -> {"left": [[fraction per unit] per layer], "right": ...}, from (N, L, H) activations."""
    out = {}
    for name in gate_names:
        a = acts[name]  # (N, L, H)
        out[name] = {"left": _rounded((a < LEFT).float().mean(0)), "right": _rounded((a > RIGHT).float().mean(0))}
    return out


def _rounded(fractions: Tensor) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in fractions]


def summary(stats: dict[str, dict]) -> list[dict]:
    """Per gate and layer: the mean fractions and how many units are saturated most of the time (either way > 50%)."""
    rows = []
    for name, s in stats.items():
        for k, (left, right) in enumerate(zip(s["left"], s["right"])):
            n = len(left)
            rows.append(
                {
                    "gate": name,
                    "layer": k,
                    "left": round(sum(left) / n, 4),
                    "right": round(sum(right) / n, 4),
                    "mostly_saturated": sum(1 for a, b in zip(left, right) if a + b > 0.5),
                    "units": n,
                }
            )
    return rows
