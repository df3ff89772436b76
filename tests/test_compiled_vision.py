"""torch.compile for the vision pass: buckets, padding, and the same numbers as eager (inductor on the CPU)."""

from __future__ import annotations

import pytest
import torch

from model.compiled_vision import CompiledVision, bucket_sizes
from model.inference import fit_class, predict_scored
from model.sowa import SowaModel


def test_bucket_sizes_pad_at_most_half() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(24) == [1, 2, 4, 8, 16, 24]
    for n in range(1, 65):  # every batch up to the largest has a bucket less than twice its size
        b = bucket_sizes(64)
        assert min(s for s in b if s >= n) < 2 * n
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        bucket_sizes(0)


def test_bad_modes_and_buckets_are_refused(tiny_model: SowaModel) -> None:
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        CompiledVision(tiny_model, "fast")
    with pytest.raises(ValueError, match="at least one bucket size"):
        CompiledVision(tiny_model, "default", [])


@pytest.mark.slow
def test_compiled_predict_and_fit_equal_eager_with_padding_and_fallback(tiny_model: SowaModel) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 64, 64, generator=g)
    shots = torch.randn(2, 3, 64, 64, generator=g)
    eager_memory = fit_class(tiny_model, shots)
    eager = [predict_scored(tiny_model, images[:n], [eager_memory] * n) for n in (1, 3, 5)]

    compiled = CompiledVision(tiny_model, "default", buckets=[4])
    assert [compiled.bucket(n) for n in (1, 3, 4, 5)] == [4, 4, 4, None]
    tiny_model.set_inference_encoder(compiled)
    compiled.warm_up()
    memory = fit_class(tiny_model, shots)  # K=2, padded to 4
    assert torch.allclose(memory.bank.features, eager_memory.bank.features, atol=1e-5)
    assert memory.calibration.threshold == pytest.approx(eager_memory.calibration.threshold, abs=1e-5)
    for n, ref in zip((1, 3, 5), eager, strict=True):  # 1 and 3 padded to 4, 5 runs eagerly
        got = predict_scored(tiny_model, images[:n], [memory] * n)
        assert got.anomaly_maps.shape == (n, 64, 64)
        assert torch.allclose(got.anomaly_maps, ref.anomaly_maps, atol=1e-4)
        assert torch.allclose(got.scores.raw, ref.scores.raw, atol=1e-4)
        assert torch.allclose(got.text_scores, ref.text_scores, atol=1e-5)
    tiny_model.set_inference_encoder(None)
    assert torch.equal(predict_scored(tiny_model, images[:3], [eager_memory] * 3).anomaly_maps,
                       eager[1].anomaly_maps)
