"""FID, KID, precision/recall and the Inception Score from feature vectors, computed by torch-fidelity.

torch-fidelity (Obukhov et al.) does the arithmetic: `fid_statistics_to_metric` (the TTUR formula),
`kid_features_to_metric` (MMD-GAN's unbiased polynomial-kernel estimate), `prc_features_to_metric`
(Kynkaanniemi et al. 2019, k-NN radii) and `isc_features_to_metric`. This module only checks inputs and
carries statistics between files and networks. Legend: N images, D feature width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskbit_runtime.errors import InputError, require
from maskbit_runtime.files import atomic_output

PRC_NEIGHBORHOOD = 3            # k of Kynkaanniemi et al.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000          # capped at the smaller set's size
IS_SPLITS = 10                  # capped at the number of images
SEED = 2020                     # torch-fidelity's default: KID subsets and IS shuffling are reproducible


def _fidelity(module: str):
    return require(f"torch_fidelity.{module}", "eval", "image-quality metrics")


@dataclass
class FeatureStats:
    """Statistics of one image set in one network's feature space: the Gaussian (mu [D], sigma [D,D]) that FID
    needs and, unless only statistics were kept, the features [N,D] that KID and precision/recall need."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    network: str | None = None
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, network: str | None = None) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise InputError(f"statistics need at least 2 feature vectors [N,D], got shape {list(features.shape)}")
        return cls(features.mean(0), np.cov(features, rowvar=False), len(features), network, features)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path, keep_features: bool = True) -> Path:
        """Write an `.npz` (mu, sigma, count, network, features) atomically (a unique temporary name, then renamed)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"statistics files end in .npz, got {path}")
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.int64(self.count),
                  "network": np.str_(self.network or "")}
        if keep_features and self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        with atomic_output(path) as partial:
            np.savez(partial, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by `save` or any `.npz` with `mu` [D] and `sigma` [D,D] (pytorch-fid, ADM)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read statistics file {path}: {exc}") from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise InputError(f"{path} is not a statistics file: expected `mu` and `sigma` "
                             f"(found {', '.join(sorted(arrays)) or 'nothing'})")
        mu, sigma = (_finite(arrays[key], key, path) for key in ("mu", "sigma"))
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise InputError(f"{path}: mu must be [D] and sigma [D,D], found mu {list(mu.shape)}, "
                             f"sigma {list(sigma.shape)}")
        features = None if "features" not in arrays else _finite(arrays["features"], "features", path)
        if features is not None and (features.ndim != 2 or features.shape[1] != len(mu)):
            raise InputError(f"{path}: features must be [N,{len(mu)}], found {list(features.shape)}")
        count = arrays.get("count")
        if count is not None and (count.shape != () or not np.issubdtype(count.dtype, np.integer) or count < 0):
            raise InputError(f"{path}: count must be one integer >= 0, found {count.dtype} {list(count.shape)}")
        count = int(count) if count is not None else (len(features) if features is not None else 0)
        network = arrays.get("network")
        if network is not None and (network.shape != () or network.dtype.kind != "U"):
            raise InputError(f"{path}: network must be one string, found {network.dtype} {list(network.shape)}")
        network = None if network is None else str(network)
        return cls(mu, sigma, count, network or None,
                   None if features is None else features.astype(np.float64))

    def check_network(self, network: str, dim: int, source: str) -> None:
        """Refuse statistics from another feature network (by name when recorded, always by width)."""
        if self.dim != dim:
            raise InputError(f"{source} has {self.dim}-dimensional statistics but the {network} features are "
                             f"{dim}-dimensional; compute the statistics with the same --features")
        if self.network and self.network != network:
            raise InputError(f"{source} was computed with {self.network}, not {network}; use the same --features")


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), via torch-fidelity (eigenvalues of S_a S_b)."""
    fid = _fidelity("metric_fid")
    value = fid.fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                         verbose=False)
    return float(value[fid.KEY_METRIC_FID])


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float]:
    """KID (mean, std over random subsets of min(subset_size, N_a, N_b) images each)."""
    import torch
    kid = _fidelity("metric_kid")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise InputError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    value = kid.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=subsets,
                                       kid_subset_size=size, rng_seed=SEED, verbose=False)
    return float(value[kid.KEY_METRIC_KID_MEAN]), float(value[kid.KEY_METRIC_KID_STD])


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = PRC_NEIGHBORHOOD) -> tuple[float, float]:
    """Improved precision (generated images inside the real k-NN manifold) and recall (real inside generated)."""
    import torch
    prc = _fidelity("metric_prc")
    check_count("precision/recall", len(generated), len(real), k + 1, f"k={k} neighbours")
    value = prc.prc_features_to_metric(torch.from_numpy(generated).float(), torch.from_numpy(real).float(),
                                       prc_neighborhood=k, verbose=False)
    return float(value[prc.KEY_METRIC_PRECISION]), float(value[prc.KEY_METRIC_RECALL])


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` splits) from unbiased logits [N,classes]."""
    import torch
    isc = _fidelity("metric_isc")
    value = isc.isc_features_to_metric(torch.from_numpy(logits), splits=min(splits, len(logits)), shuffle=True,
                                       rng_seed=SEED)
    return float(value[isc.KEY_METRIC_ISC_MEAN]), float(value[isc.KEY_METRIC_ISC_STD])


def check_count(metric: str, count_a: int, count_b: int, needed: int, why: str) -> None:
    if min(count_a, count_b) < needed:
        raise InputError(f"{metric} needs at least {needed} images per set ({why}); got {count_a} and {count_b}")


def compare(samples: FeatureStats, reference: FeatureStats, k: int = PRC_NEIGHBORHOOD) -> dict:
    """FID always; KID and precision/recall when both sides kept their features (else None, with a note)."""
    report = {"fid": frechet_distance(samples, reference), "kid": None, "kid_std": None,
              "precision": None, "recall": None}
    if samples.features is None or reference.features is None:
        report["note"] = "reference holds statistics only (mu, sigma): KID and precision/recall need its features"
        return report
    report["kid"], report["kid_std"] = kernel_distance(samples.features, reference.features)
    report["precision"], report["recall"] = precision_recall(samples.features, reference.features, k)
    return report


def _finite(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """A statistics array as float64, refused in one line unless it holds real finite numbers."""
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or
                                       np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{path}: {key} must hold real numbers, found dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path}: {key} holds NaN or infinity; recompute the statistics")
    return array
