"""torch.compile for the vision pass: buckets, padding, and the same numbers as eager (inductor on the CPU)."""

from __future__ import annotations

import pytest
import torch

from model.compiled_vision import CompiledVision, bucket_sizes
from model.inference import fit_class, predict_scored
from model.sowa import SowaModel


def test_buckets_are_one_then_halvings_of_the_largest_batch_down_to_eight() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(4) == [1, 4]
    assert bucket_sizes(16) == [1, 8, 16]
    assert bucket_sizes(24) == [1, 12, 24]
    assert bucket_sizes(64) == [1, 8, 16, 32, 64]  # 5 compiles where powers of two made 7
    assert bucket_sizes(64, floor=4) == [1, 4, 8, 16, 32, 64]
    for top in (9, 24, 64, 100):
        b = bucket_sizes(top)
        for n in range(1, top + 1):  # from the floor up, padding stays under half a batch
            bucket = min(s for s in b if s >= n)
            assert bucket < 2 * n or (n < 8 and bucket == b[1])
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        bucket_sizes(0)
    with pytest.raises(ValueError, match="floor must be >= 1"):
        bucket_sizes(8, floor=0)


def test_bad_modes_and_buckets_are_refused(tiny_model: SowaModel) -> None:
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        CompiledVision(tiny_model, "fast")
    with pytest.raises(ValueError, match="at least one bucket size"):
        CompiledVision(tiny_model, "default", [])


@pytest.mark.slow
def test_compiled_predict_and_fit_equal_eager_with_padding_and_fallback(tiny_model: SowaModel,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 64, 64, generator=g)  # made outside inference mode, as a caller's would be
    shots = torch.randn(2, 3, 64, 64, generator=g)
    eager_memory = fit_class(tiny_model, shots)
    sizes = (1, 3, 4, 5)
    eager = [predict_scored(tiny_model, images[:n], [eager_memory] * n) for n in sizes]

    compiled = CompiledVision(tiny_model, "default", buckets=[4])
    assert [compiled.bucket(n) for n in sizes] == [4, 4, 4, None]
    tiny_model.set_inference_encoder(compiled)
    compiled.warm_up()
    # after the warm-up nothing may compile again: not the padded batches, not an input made outside inference
    # mode, not the position-bias cache filling up
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    memory = fit_class(tiny_model, shots)  # K=2, padded to 4
    assert torch.allclose(memory.bank.features, eager_memory.bank.features, atol=1e-5)
    assert memory.calibration.threshold == pytest.approx(eager_memory.calibration.threshold, abs=1e-5)
    for n, ref in zip(sizes, eager, strict=True):  # 1 and 3 padded to 4, 4 as it is, 5 runs eagerly
        got = predict_scored(tiny_model, images[:n], [memory] * n)
        assert got.anomaly_maps.shape == (n, 64, 64)
        assert torch.allclose(got.anomaly_maps, ref.anomaly_maps, atol=1e-4)
        assert torch.allclose(got.scores.raw, ref.scores.raw, atol=1e-4)
        assert torch.allclose(got.text_scores, ref.text_scores, atol=1e-5)
    tiny_model.set_inference_encoder(None)
    assert torch.equal(predict_scored(tiny_model, images[:3], [eager_memory] * 3).anomaly_maps,
                       eager[1].anomaly_maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs")
def test_cuda_graph_replays_do_not_overwrite_what_escaped_them(tiny_model: SowaModel) -> None:
    dev = torch.device("cuda")
    tiny_model.to_inference(dev, torch.float32)
    g = torch.Generator().manual_seed(0)
    shots, images = torch.randn(4, 3, 64, 64, generator=g).to(dev), torch.randn(4, 3, 64, 64, generator=g).to(dev)
    eager_raw = tiny_model.predict(shots).raw_patches
    eager_memory = fit_class(tiny_model, shots)
    eager = predict_scored(tiny_model, images, [eager_memory] * 4)
    compiled = CompiledVision(tiny_model, "reduce-overhead", [4])
    assert compiled.cuda_graphs
    tiny_model.set_inference_encoder(compiled)
    compiled.warm_up()
    raw = tiny_model.predict(shots).raw_patches  # escapes the replay that made it
    memory = fit_class(tiny_model, shots)
    got = predict_scored(tiny_model, images, [memory] * 4)  # a replay on other images reuses the output memory
    assert torch.allclose(raw, eager_raw, atol=1e-4)
    assert torch.allclose(memory.bank.features, eager_memory.bank.features, atol=1e-4)
    assert torch.allclose(got.anomaly_maps, eager.anomaly_maps, atol=1e-3)
