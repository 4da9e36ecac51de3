"""prime_trl.algo.rollout: prompts tokenised, padded and completions cut as TRL's GRPOTrainer does."""

import helpers
import pytest
import torch

from prime_trl.algo.rollout import cut_at_first_eos, left_padded_prompts, prompt_token_ids
from prime_trl.tiny import build_tokenizer

torch.set_num_threads(1)

PROMPTS = [
    "Q1=",
    [{"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
]


@pytest.mark.parametrize("make_tokenizer", [build_tokenizer, helpers.bos_tokenizer], ids=["tiny", "bos"])
def test_prompt_ids_are_trls(make_tokenizer):
    tokenizer = make_tokenizer()
    for prompt in PROMPTS:
        assert prompt_token_ids(tokenizer, prompt) == helpers.trl_prompt_ids(tokenizer, [prompt])[0], prompt


def test_left_padding():
    ids, mask = left_padded_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cut_at_first_eos():
    generated = torch.tensor(
        [
            [3, 9, 4, 9, 5],  # first EOS (9) at index 1: kept, everything after becomes padding
            [3, 4, 5, 6, 7],  # no EOS: truncated, all ones
            [2, 8, 0, 0, 0],  # the second EOS id (8) counts too
        ]
    )
    ids, mask = cut_at_first_eos(generated, eos_ids=[9, 8], pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ids.tolist() == [[3, 9, 0, 0, 0], [3, 4, 5, 6, 7], [2, 8, 0, 0, 0]]
    short_ids, short_mask = cut_at_first_eos(generated[[0, 2]], eos_ids=[9, 8], pad_id=0)
    assert short_ids.tolist() == [[3, 9], [2, 8]] and short_mask.tolist() == [[1, 1], [1, 1]]  # unused columns go
