"""One row's SHAP contributions: ``Booster.predict(pred_contrib=True)`` (what the service calls) against LightGBM's
single-row fast C API (``LGBM_BoosterPredictForMatSingleRowFast``, which sets up its predictor once).

Both run on the same rows of a model trained with the training defaults on the synthetic data of
``bench.serve_load`` (one thread, as the service uses for small requests); the fast path's contributions must equal
``predict``'s. Answers whether the per-call set-up of ``predict`` is worth bypassing: the ratio is measured in the
same run, alternating the two paths row by row.

    python -m bench.single_row [--domain finance] [--rows 20000] [--items 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import dataset, events_and_cases, machine, percentiles, write_json

C_API_PREDICT_CONTRIB = 3
C_API_DTYPE_FLOAT64 = 1


class FastContrib:
    """``predict(row, pred_contrib=True)`` through the single-row fast C API (configuration set up once)."""

    def __init__(self, booster, n_features: int) -> None:
        from lightgbm.basic import _LIB, _c_str, _safe_call

        self._lib, self._check = _LIB, _safe_call
        self._config = ctypes.c_void_p()
        _safe_call(_LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(C_API_PREDICT_CONTRIB), ctypes.c_int(0), ctypes.c_int(-1),
            ctypes.c_int(C_API_DTYPE_FLOAT64), ctypes.c_int32(n_features), _c_str("num_threads=1"),
            ctypes.byref(self._config)))
        self._out = np.empty(n_features + 1, np.float64)
        self._len = ctypes.c_int64()

    def __call__(self, row: np.ndarray) -> np.ndarray:
        row = np.ascontiguousarray(row, dtype=np.float64)
        self._check(self._lib.LGBM_BoosterPredictForMatSingleRowFast(
            self._config, row.ctypes.data_as(ctypes.c_void_p), ctypes.byref(self._len),
            self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))))
        return self._out[: self._len.value].copy()

    def close(self) -> None:
        self._check(self._lib.LGBM_FastConfigFree(self._config))


def run(domain: str, rows: int, items: int, work: Path) -> dict:
    from features.domains import feature_set
    from serving.fast_path import model_array
    from training.pipeline import TrainConfig, train

    path = dataset(domain, rows, work)
    bundle = train(domain, path, config=TrainConfig(seed=0, num_threads=1, track=False, quiet=True)).bundle
    events, cases = events_and_cases(domain, path)
    fs = feature_set(domain)
    X = model_array(bundle, fs.build(events, cases).iloc[-items:])  # the latest rows, with their history
    fast = FastContrib(bundle.booster, X.shape[1])
    try:
        for i in range(min(50, len(X))):  # same contributions, row by row
            expected = bundle.booster.predict(X[i:i + 1], pred_contrib=True, num_threads=1)[0]
            if not np.allclose(fast(X[i]), expected, rtol=1e-12, atol=1e-12):
                raise AssertionError(f"row {i}: the fast path's contributions differ from predict's")
        predict_s, fast_s = [], []
        for i in range(len(X)):
            start = time.perf_counter()
            bundle.booster.predict(X[i:i + 1], pred_contrib=True, num_threads=1)
            predict_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast(X[i])
            fast_s.append(time.perf_counter() - start)
    finally:
        fast.close()
    out = {"trees": bundle.booster.num_trees(), "features": X.shape[1], "predict": percentiles(predict_s),
           "fast": percentiles(fast_s)}
    out["fast_over_predict_p50"] = out["fast"]["p50_ms"] / out["predict"]["p50_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=["customs", "finance"], default="finance")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="riskscore-single-row-") as tmp:
        result = run(args.domain, args.rows, args.items, Path(tmp))
    p, f = result["predict"], result["fast"]
    print(f"{args.domain}: {result['trees']} trees, {result['features']} features, {p['n']} rows")
    print(f"  predict(pred_contrib)   p50 {p['p50_ms']:.3f} ms  p99 {p['p99_ms']:.3f} ms")
    print(f"  single-row fast C API   p50 {f['p50_ms']:.3f} ms  p99 {f['p99_ms']:.3f} ms  "
          f"({result['fast_over_predict_p50']:.2f} of predict)")
    write_json(args.json, {"machine": machine(), "args": vars(args), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
