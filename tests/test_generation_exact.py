"""Cached generation (``generate``, the server's ``StepDecoder``) gives, for every method and
for rows batched with left padding, the tokens that greedy decoding by full forward passes over
each prompt alone gives: the key/value cache, the padding and the batch change nothing."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from peftkit.generation import Sequence, StepDecoder, generate, left_padded
from peftkit.methods import apply_method
from peftkit.methods.registry import METHODS, AnyMethod

from .conftest import LM_WORDS, build_lm, make_lm_tokenizer

OPTIONS = {
    "lora": {"target_modules": "all-linear"},
    "vera": {"target_modules": ["q_proj", "v_proj"], "r": 4},
    "adalora": {"total_step": 10},
    "prompt": {"init": "vocab"},
    "ptuning": {"encoder": "mlp"},
}
PROMPTS = [["the", "film", "was", "good"], ["bad"], ["a", "dull", "and", "tedious", "story", "really"]]
NEW_TOKENS = 5


def adapted_llama(method: str) -> torch.nn.Module:
    """The tiny LLaMA with ``method`` applied and its trainable tensors moved off their
    initial values (several methods start as the identity, which would prove nothing)."""
    model = build_lm("qwen2" if method == "bitfit" else "llama")
    cfg = TypeAdapter(AnyMethod).validate_python({"name": method, **OPTIONS.get(method, {})})
    apply_method(model, cfg, modules_to_save=[])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.std() if p.numel() > 1 else 1) + 0.05)
    return model.eval()


@torch.no_grad()
def full_forward_logits(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """``(len(answer), vocab)``: the logits that chose each answer token, from one forward pass
    over the prompt alone with the answer so far, no cache."""
    logits = model(input_ids=torch.tensor([prompt + answer]), use_cache=False).logits[0]
    return logits[-len(answer) - 1 : -1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cached_batched_padded_generation_equals_full_forward_greedy(method):
    tok = make_lm_tokenizer()
    model = adapted_llama(method)
    prompts = [[LM_WORDS.index(w) for w in p] for p in PROMPTS]
    never = len(LM_WORDS) + 1  # no token stops a row early

    # transformers' generate over the left-padded batch, as peftkit's generate() calls it
    ids, mask = left_padded(prompts, tok.pad_token_id, "cpu")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=never,
        return_dict_in_generate=True,
        output_logits=True,
    )
    answers = [out.sequences[r, ids.shape[1] :].tolist() for r in range(len(prompts))]
    for r, (prompt, answer) in enumerate(zip(prompts, answers)):
        cached = torch.stack([step[r] for step in out.logits])
        torch.testing.assert_close(cached, full_forward_logits(model, prompt, answer), atol=1e-4, rtol=0)
    as_text = [tok.decode(a, skip_special_tokens=True) for a in answers]
    assert (
        generate(model, tok, prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts), stop_ids=[never]) == as_text
    )
    assert [generate(model, tok, [p], max_new_tokens=NEW_TOKENS, stop_ids=[never])[0] for p in prompts] == as_text

    # the server's step decoder, a row joining the running batch after its first step
    decoder, seen = StepDecoder(model, tok.pad_token_id), {}
    choose = decoder._choose

    def record(rows, logits):
        for row, scores in zip(rows, logits):
            seen.setdefault(id(row), []).append(scores.clone())
        choose(rows, logits)

    decoder._choose = record
    rows = [Sequence(p, NEW_TOKENS) for p in prompts]
    decoder.add(rows[:2])
    decoder.step()
    decoder.add(rows[2:])
    while any(r.finish is None for r in rows):
        decoder.step()
    for row in rows:
        torch.testing.assert_close(
            torch.stack(seen[id(row)][:NEW_TOKENS]),
            full_forward_logits(model, row.prompt, row.tokens),
            atol=1e-4,
            rtol=0,
        )
