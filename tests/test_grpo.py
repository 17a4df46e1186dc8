"""GRPO's arithmetic against TRL 1.16's GRPOTrainer: on a fixed batch (prompts, completions, rewards,
old and reference log-probabilities) on a tiny LLaMA, the loss and its gradient for every loss type,
and the advantages for every reward scaling."""

from __future__ import annotations

import pytest
import torch

from peftkit.grpo import LOSS_TYPES, completion_token_logps, group_advantages, policy_loss

trl = pytest.importorskip("trl", reason="needs trl (make dev)")

TEMPERATURE = 0.7
EPSILON, EPSILON_HIGH, MAX_COMPLETION = 0.2, 0.28, 6


def trainer(model, tokenizer, tmp_path, **options):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        use_cpu=True,
        bf16=False,
        report_to=[],
        **options,
    )
    data = Dataset.from_list([{"prompt": "review : great fun"}] * 4)
    done = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    done.current_gradient_accumulation_steps = 1
    return done


def fixed_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(8, vocab, (4, 5), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2:, :2] = 0  # left padding, as TRL pads prompts
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(8, vocab, (4, MAX_COMPLETION), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trl_s(loss_type, beta, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    t = trainer(theirs, tok, tmp_path, loss_type=loss_type, beta=beta)
    prompt_ids, prompt_mask, completion_ids, completion_mask = fixed_batch(len(tok))
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():  # sampled with a policy a little older, scored against a reference a little apart
        now = completion_token_logps(ours, ids, mask, MAX_COMPLETION, TEMPERATURE)
    g = torch.Generator().manual_seed(1)
    old = (now + 0.3 * torch.randn(now.shape, generator=g)) * completion_mask  # some ratios leave the clip range
    ref = (now + 0.5 * torch.randn(now.shape, generator=g)) * completion_mask  # 0 on padding, as TRL has them
    advantages = torch.randn(4, generator=g)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    t.model.train()
    want = t._compute_loss(t.model, inputs)
    want.backward()
    ours.train()
    logps = completion_token_logps(ours, ids, mask, MAX_COMPLETION, TEMPERATURE)
    got = policy_loss(
        logps,
        advantages,
        completion_mask,
        old_logps=old,
        ref_logps=ref,
        loss_type=loss_type,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        beta=beta,
        max_completion_length=MAX_COMPLETION,
    )
    got.loss.backward()
    assert torch.isfinite(want) and abs(float(got.loss.detach()) - float(want.detach())) <= 1e-5
    grads = dict(t.model.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-5)
    assert 0.0 < got.clipped < 1.0 and (got.kl is None) == (beta == 0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl_s(scale, tiny_llama_dir, tmp_path):
    """TRL's _generate_and_score_completions normalises summed rewards; the same arithmetic on
    rewards with ties (a zero-spread group) and spread."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0, 0.25, 3.0])
    got = group_advantages(rewards, 2, scale)
    grouped = rewards.view(-1, 2)
    mean = grouped.mean(1).repeat_interleave(2)
    # TRL's nanstd: the unbiased spread, of the group or of the batch
    spread = {"group": grouped.std(1).repeat_interleave(2), "batch": rewards.std().expand(8)}.get(scale)
    want = rewards - mean if spread is None else (rewards - mean) / (spread + 1e-4)
    torch.testing.assert_close(got, want)
    assert got[2] == 0 and got[3] == 0  # a group whose completions tie teaches nothing
    from trl.trainer.utils import nanstd

    torch.testing.assert_close(nanstd(grouped, dim=1), grouped.std(1))
