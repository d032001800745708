"""The tokenizer benchmark's PCA baseline (bench/pca_baseline.py): axes and quantised round trips."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pca_baseline import QuantizedPCA, principal_axes  # noqa: E402


def spread_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) rows with distinct variances along random orthogonal axes, centred."""
    rng = np.random.default_rng(seed)
    axes = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = rng.normal(size=(n, d)) * np.linspace(5.0, 0.1, d) @ axes
    return x - x.mean(0)


@pytest.mark.parametrize("n, d", [(400, 60), (40, 60)])   # scatter-matrix path, SVD path
def test_principal_axes_are_the_svds(n, d):
    x = spread_rows(n, d)
    ours, svd = principal_axes(x), np.linalg.svd(x, full_matrices=False)[2]
    assert ours.shape == svd.shape == (min(n, d), d)
    k = min(n, d) // 2     # well-separated leading axes agree up to sign
    np.testing.assert_allclose(np.abs((ours[:k] * svd[:k]).sum(1)), 1.0, atol=1e-9)
    np.testing.assert_allclose(ours @ ours.T, np.eye(len(ours)), atol=1e-9)


def test_round_trip_of_rank_k_rows_at_many_bits_is_close_and_few_bits_is_not():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 40)) + 2.0      # rank 3 + offset
    pca = QuantizedPCA.fit(rows)
    rich = next(p for p in pca.plans(48) if p.name == "uniform k=4 x 12 bits")
    poor = next(p for p in pca.plans(1) if p.name.startswith("uniform k=1"))
    # median error: the quantiser clips coefficients outside the training 0.1-99.9 percentiles
    err = lambda plan: np.median(np.abs(pca.round_trip(rows, plan) - rows)) / rows.std()
    assert err(rich) < 1e-3 < 0.1 < err(poor), (err(rich), err(poor))


def bench_tokenizers():
    """bench/tokenizers.py as a module, loaded by path: HF has a `tokenizers` package."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / "tokenizers.py"
    spec = importlib.util.spec_from_file_location("bench_tokenizers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_stamp_flux_pull_counts_a_faint_offset_and_skips_masked_pixels():
    from types import SimpleNamespace
    bench = bench_tokenizers()
    flux_pull = bench.flux_pull
    rng = np.random.default_rng(0)
    ivar = np.full((2, 32, 32), 4.0)                                   # sigma 0.5 per pixel
    mask = np.zeros((2, 32, 32), dtype=bool)
    mask[:, :4] = True                                                 # 128 masked pixels per band
    rec = SimpleNamespace(ivar=ivar, mask=mask)
    truth = rng.normal(0, 1, (2, 32, 32))
    assert flux_pull(truth, truth, rec) == 0.0
    # 0.1 sigma on each of the 896 good pixels: 0.1 * 896 / sqrt(896) = 2.99 sigma
    assert flux_pull(truth + 0.05, truth, rec) == pytest.approx(0.1 * 896 ** 0.5, rel=1e-9)
    garbage = np.where(mask, 1e9, truth + 0.05)                        # what lies under the mask is ignored
    assert flux_pull(garbage, truth, rec) == pytest.approx(0.1 * 896 ** 0.5, rel=1e-9)


def test_residual_by_snr_finds_a_faint_offset_in_its_bin():
    from types import SimpleNamespace
    bench = bench_tokenizers()
    ivar = np.full((1, 10, 10), 1.0)                                   # sigma 1
    truth = np.zeros((1, 10, 10))
    truth[0, :5] = 2.0                                                 # half the pixels at S/N 2
    truth[0, 9, 9] = 50.0                                              # one bright pixel
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 9, 0] = True                                               # a sky pixel left out
    rec = SimpleNamespace(ivar=ivar, mask=mask)
    recon = truth + np.where(truth == 2.0, 0.4, 0.0)                   # faint light 0.4 sigma too bright
    recon[0, 9, 9] = 45.0                                              # the bright pixel 5 sigma low
    out = bench.residual_by_snr([recon], [truth], [rec])
    assert out["1-3"]["mean"] == pytest.approx(0.4) and out["1-3"]["pixels"] == pytest.approx(50 / 99, abs=1e-4)
    assert out["10-inf"]["mean"] == pytest.approx(-5.0) and out["0-0.3"]["rms"] == 0.0
    assert out["0.3-1"]["mean"] is None
    assert out["10-inf"]["chi2_share"] == pytest.approx(25 / (25 + 50 * 0.16), abs=1e-4)


def test_by_class_takes_each_class_median():
    bench = bench_tokenizers()
    out = bench.by_class([0.1, 0.3, 0.2, 5.0, 7.0], ["galaxy", "galaxy", "galaxy", "star", "qso"])
    assert out == {"galaxy": 0.2, "qso": 7.0, "star": 5.0}


def test_bench_images_gives_each_class_its_own_median(sky_shards):
    """End to end on the tiny sky: the image bench reports chi2_truth per object class for
    the tokenizer and for PCA, one entry per class present, and the overall median lies
    within the classes' range."""
    import torch
    from heldout_data import load_samples
    from omnisky.tokenizers.image import ImageConfig, ImageTokenizer
    bench = bench_tokenizers()
    samples = load_samples(Path(sky_shards))
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageConfig(size=32)).eval()
    out = bench.bench_images(tok, samples[:16], samples[16:], {})
    row = out["sim.image.des"]
    classes = {s.meta["class"] for s in samples[16:] if "image.des" in s.records}
    for figures in (row["chi2_truth_by_class"], row["pca"]["chi2_truth_by_class"]):
        assert set(figures) == classes and all(v >= 0 for v in figures.values())
    mine = row["chi2_truth_by_class"].values()
    assert min(mine) <= row["chi2_truth"] <= max(mine)
