"""Fit the table behind the AVX-512 kernel's softplus (``kSoftplusTable`` in workbench/_native_src/avx512_math.h)
and measure its error in float32, evaluated exactly as the kernel does.

    python scripts/fit_softplus.py            # prints the error and the C++ table rows

softplus(a) = max(a, 0) + g(|a|) with g(t) = log1p(exp(-t)); g is tabulated on 32 intervals of width 1/2 over [0, 16)
as a degree-5 polynomial in the offset from each interval's centre (least squares on Chebyshev nodes), and t is
clamped just below 16 (g(16) = 1.1e-7).
"""
import numpy as np

INTERVALS, WIDTH, DEGREE, NODES = 32, 0.5, 5, 200


def g(t):
    return np.log1p(np.exp(-t))


def fit() -> np.ndarray:
    """(DEGREE + 1, INTERVALS) float32 coefficients, lowest degree first."""
    k = np.arange(NODES)
    nodes = np.cos(np.pi * (k + 0.5) / NODES) * WIDTH / 2
    vandermonde = np.vander(nodes, DEGREE + 1, increasing=True)
    coefficients = np.zeros((DEGREE + 1, INTERVALS))
    for i in range(INTERVALS):
        centre = (i + 0.5) * WIDTH
        coefficients[:, i] = np.linalg.lstsq(vandermonde, g(centre + nodes), rcond=None)[0]
    return coefficients.astype(np.float32)


def evaluate(coefficients: np.ndarray, t: np.ndarray) -> np.ndarray:
    """g(t) as the kernel computes it, in float32."""
    t = np.minimum(t.astype(np.float32), np.float32(15.999999))
    i = (t * np.float32(2)).astype(np.int32)
    u = (t - np.float32(0.25)) - np.float32(0.5) * i.astype(np.float32)
    y = coefficients[DEGREE][i]
    for d in range(DEGREE - 1, -1, -1):
        y = (y * u + coefficients[d][i]).astype(np.float32)
    return y


def main() -> None:
    coefficients = fit()
    t = np.linspace(0, 40, 4_000_001, dtype=np.float32)
    truth = g(t.astype(np.float64))
    error = np.abs(evaluate(coefficients, t) - truth)
    inside = t < 16
    print(f"max abs error {error.max():.3g} (t >= 16: the clamp), below 16: abs {error[inside].max():.3g}, "
          f"relative {(error / truth)[inside].max():.3g}")
    for row in coefficients:
        print("{" + ", ".join(f"{v:.9e}f" for v in row) + "},")


if __name__ == "__main__":
    main()
