from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.device import resolve_device, resolve_dtype, set_fp32_precision, to_device
from model.sowa import SowaModel
from model.text import PromptFusion, encode_prompts


def test_device_and_dtype_choices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("FP16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    for bad in ("tpu", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(ValueError):
            resolve_device(bad)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        resolve_dtype("int8")


@pytest.fixture()
def _precision_flags() -> object:
    """Restore the process-wide fp32 precision flags a test changes."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.usefixtures("_precision_flags")
def test_fp32_on_cuda_turns_tf32_off_in_matmuls_and_convolutions() -> None:
    # the flags exist without a GPU, so what is set can be checked here; test_sowa checks what it does on one
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = "tf32", "tf32"
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16), ("cuda:0", torch.float16)):
        assert not set_fp32_precision(device, dtype)
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert set_fp32_precision(torch.device("cuda", 0), torch.float32)
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"


def _flags() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.mark.usefixtures("_precision_flags")
def test_to_inference_sets_the_fp32_precision_flags(tiny_model: SowaModel) -> None:
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = "tf32", "tf32"
    tiny_model.to_inference("cpu", torch.float32)  # the CPU: torch's flags are left alone
    assert _flags() == ("tf32", "tf32") and tiny_model.text_features.dtype == torch.float32
    tiny_model.to_inference("cpu", torch.bfloat16)
    assert _flags() == ("tf32", "tf32") and tiny_model.clip.visual.conv1.weight.dtype == torch.bfloat16
    assert tiny_model.text_features.dtype == torch.float32  # the cached text vectors stay fp32
    # fp32 on CUDA: the flags are set before the weights move, so without a GPU (where the move fails) they are
    # still what a GPU run gets
    try:
        tiny_model.to_inference("cuda", torch.float32)
    except (RuntimeError, AssertionError):
        assert not torch.cuda.is_available()
    assert _flags() == ("ieee", "ieee")


def test_to_device_on_the_cpu_is_the_same_tensor_values() -> None:
    t = torch.arange(5)
    assert torch.equal(to_device(t, torch.device("cpu")), t)


def test_fusion_pools_templates_then_normalises() -> None:
    fusion = PromptFusion(4)
    with torch.no_grad():
        fusion.linear.weight.copy_(torch.eye(4))
        fusion.linear.bias.zero_()
    # 2 states x 1 class x 2 templates: the mean of the two templates, then unit length
    feats = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 3.0]])
    out = fusion(feats, num_classes=1)
    assert out.shape == (1, 2, 4)
    assert torch.allclose(out[0, 0], F.normalize(torch.tensor([0.5, 0.5, 0, 0]), dim=0))
    assert torch.allclose(out[0, 1], F.normalize(torch.tensor([0, 0, 1.5, 1.5]), dim=0))


def test_prompt_encoding_reads_the_eot_token(tiny_model: SowaModel) -> None:
    clip = tiny_model.clip
    prompts, ids = tiny_model.prompt_learner(clip.token_embedding)
    feats = encode_prompts(clip, prompts, ids)
    assert feats.shape == (2, 32)
    # with the placeholders' own embeddings instead of learned contexts, it is open_clip's encode_text
    plain = encode_prompts(clip, clip.token_embedding(ids.long()), ids)
    assert torch.allclose(plain, clip.encode_text(ids.long()), atol=1e-5)
    assert not torch.allclose(feats, plain)
