from __future__ import annotations

import torch

from model.config import PromptConfig
from model.prompts import PromptLearner, prompt_strings, tokenize_prompts


def test_prompt_strings_and_token_ids_match_the_reference() -> None:
    normal, anomaly = prompt_strings(PromptConfig())
    assert normal == [["X X X X X X X X X X X X object."]]
    assert anomaly == [["X X X X X X X X X X X X damaged object."]]
    ids_n, ids_a = tokenize_prompts(PromptConfig())
    assert ids_n.shape == ids_a.shape == (1, 1, 77) and ids_n.dtype == torch.int32
    # spec §3: SOT 49406, "x" 343 x 12, "object" 14115, "." 269, EOT 49407, zero padding
    assert ids_n[0, 0, :16].tolist() == [49406, *[343] * 12, 14115, 269, 49407]
    assert ids_a[0, 0, :17].tolist() == [49406, *[343] * 12, 13568, 14115, 269, 49407]
    assert ids_n[0, 0, 16:].abs().sum() == 0


def test_learner_puts_contexts_between_prefix_and_suffix() -> None:
    cfg = PromptConfig(length=3, class_names=("a", "b"), normal_templates=("{}", "a {}"),
                       anomaly_templates=("bad {}", "a bad {}"))
    ids_n, ids_a = tokenize_prompts(cfg)
    emb = torch.nn.Embedding(49408, 8)
    pl = PromptLearner(ids_n, ids_a, 3, 8)
    prompts, ids = pl(emb)
    assert prompts.shape == (8, 77, 8) and ids.shape == (8, 77)  # 2 states x 2 classes x 2 templates
    assert torch.equal(prompts[0, 1:4], pl.ctx_pos[0, 0])
    assert torch.equal(prompts[4, 1:4], pl.ctx_neg[0, 0])
    assert torch.equal(prompts[0, 0], emb.weight[49406])
    assert torch.equal(prompts[5, 4:], emb(ids_a[0, 1, 4:].long()))
