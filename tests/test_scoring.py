"""prime_trl.apps.scoring and `prime-trl score`: steps, implicit rewards, best-of-N reranking, the HTML heat map."""

import json
import random

import pytest
import torch
from helpers import bos_tokenizer, trl_prompt_ids
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from prime_trl.algo.prm import ImplicitPRM, save_adapter
from prime_trl.apps.cli import main
from prime_trl.apps.scoring import (
    Candidate,
    Problem,
    ScoredResponse,
    encode_responses,
    html_page,
    rerank,
    score_responses,
    split_steps,
)

# Larger than PRIME's 0.05 so that a few dozen CE steps fit the tiny PRM; rankings do not depend on beta.
BETA = 0.5


# ----- steps --------------------------------------------------------------------------------------------------


def pieces(text, mode):
    return [text[a:b] for a, b in split_steps(text, mode)]


def test_split_steps_named_modes_and_regex():
    text = "[ASSESS]\n\nread it\n\n[ADVANCE]\n\nx = 2\ny = 3\n\n[OUTPUT]\n\n\\boxed{5}"
    assert pieces(text, "action") == [
        "[ASSESS]\n\nread it\n\n",
        "[ADVANCE]\n\nx = 2\ny = 3\n\n",
        "[OUTPUT]\n\n\\boxed{5}",
    ]
    assert pieces("a\n\nb\nc\n\nd", "blank") == ["a\n\n", "b\nc\n\n", "d"]
    assert pieces("a\nb\n", "newline") == ["a\n", "b\n"]
    assert pieces("5*3=15;7+15=22;\\boxed{22}", ";") == ["5*3=15;", "7+15=22;", "\\boxed{22}"]
    assert pieces("one step", "none") == ["one step"]
    assert pieces(text, "auto") == pieces(text, "action")
    assert pieces("a\n\nb", "auto") == ["a\n\n", "b"]
    assert pieces("a\nb", "auto") == ["a\n", "b"]
    assert "".join(pieces(text, "newline")) == text  # steps always cover the text
    with pytest.raises(ValueError, match="regex"):
        split_steps("x", "(")


# ----- implicit rewards ---------------------------------------------------------------------------------------


def prm_model(model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(base, config, adapter_name="prm"), AutoTokenizer.from_pretrained(model_dir)


def test_token_and_step_rewards_match_the_definition(tiny_model_dir):
    model, tokenizer = prm_model(tiny_model_dir)
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # move the PRM away from the reference
        if ".prm." in name:
            param.data.normal_(0, 0.3)
    prompts = ["Q: 1+1?\n", "Q: a longer prompt, 2+2?\n"]
    responses = ["line one\nline two", "4"]
    scored = score_responses(model, tokenizer, prompts, responses, beta=BETA, step_split="newline", progress=False)

    for item, prompt, response in zip(scored, prompts, responses):
        assert "".join(item.tokens) == response  # the pieces rebuild the text (+ the empty EOS piece)
        assert item.tokens[-1] == "" and len(item.tokens) == len(item.token_rewards)
        assert sum(item.step_rewards) == pytest.approx(item.reward, abs=1e-6)
        assert [item.text[:0] + s for s in item.steps] == pieces(response, "newline")
        # Direct computation on the unpadded row: beta * (log p_prm - log p_ref) of every response token + EOS.
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            with model.disable_adapter():
                ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
            prm = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        targets = torch.tensor(ids[1:])
        expected = BETA * (prm.gather(-1, targets[:, None]) - ref.gather(-1, targets[:, None])).squeeze(-1)[start - 1 :]
        assert torch.allclose(torch.tensor(item.token_rewards), expected, atol=1e-5)
    assert len(scored[0].steps) == 2 and scored[0].step_spans[0] == (0, len("line one\n"))


def test_untrained_prm_gives_zero_rewards_and_reranks_like_random(tiny_model_dir):
    """A fresh PRM adapter equals the reference: every reward is 0, so best-of-N is a uniform pick (its exact
    expectation, not the first candidate)."""
    model, tokenizer = prm_model(tiny_model_dir)
    problem = Problem("p", "Q:", [Candidate("a", 0.0), Candidate("b", 1.0), Candidate("c", 0.0), Candidate("d", 0.0)])
    scored = score_responses(model, tokenizer, ["Q:"] * 4, ["a", "b", "c", "d"], progress=False)
    assert all(value == 0.0 for s in scored for value in s.token_rewards)
    summary = rerank([problem], [scored])
    assert summary["accuracy"]["prm_rerank"] == summary["accuracy"]["random"] == 0.25
    assert summary["accuracy"]["oracle"] == 1.0


def test_html_heat_map_escapes_text_and_colours_by_sign():
    item = ScoredResponse(
        text="<b>&",
        tokens=["<b>", "&", ""],
        token_rewards=[0.5, -0.5, 0.0],
        steps=["<b>&"],
        step_spans=[(0, 3)],
        step_rewards=[0.0],
        reward=0.0,
        label=1.0,
    )
    page = html_page([item])
    assert "&lt;b&gt;" in page and "<b>&" not in page.split("<body>")[1]
    assert "rgba(26,160,60,1.000)" in page and "rgba(220,40,40,1.000)" in page  # +0.5 green, -0.5 red at full scale
    assert "correct" in page and "EOS" in page


# ----- best-of-N with a PRM trained to prefer correct answers -----------------------------------------------


def synthetic_problem(rng, index):
    """Four candidates: one correct, written 'Checked: ...', and three wrong ones written 'Guess: ...', two of which
    agree - so majority vote picks a wrong answer and a uniform pick is right a quarter of the time."""
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    gold, wrong, other = a + b, a + b + rng.randint(1, 9), a + b - rng.randint(1, 9)
    prompt = [{"role": "user", "content": f"What is {a}+{b}? Put the answer in \\boxed{{}}."}]
    candidates = [f"Checked: {a}+{b}={gold}. \\boxed{{{gold}}}"] + [
        f"Guess: \\boxed{{{w}}}" for w in (wrong, wrong, other)
    ]
    labels = [1.0, 0.0, 0.0, 0.0]
    order = list(range(4))
    rng.shuffle(order)
    return {
        "id": f"sum-{index}",
        "prompt": prompt,
        "responses": [candidates[i] for i in order],
        "labels": [labels[i] for i in order],
        "answer": str(gold),
        "task": "math",
    }


def train_prm(model, tokenizer, rows, steps):
    """CE steps of the implicit PRM on labelled candidates (prime_trl.algo.prm, as the trainer does)."""
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    responses = [r for row in rows for r in row["responses"]]
    labels = torch.tensor([label for row in rows for label in row["labels"]])
    batch = encode_responses(tokenizer, prompts, responses, append_eos=True)
    prm = ImplicitPRM(model, "prm", beta=BETA, micro_batch_size=len(responses))
    prm.create_optimizer(learning_rate=1e-2)
    model.train()
    losses = [prm.score_and_update(batch, labels).loss for _ in range(steps)]
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained_prm(tiny_model_dir, tmp_path_factory):
    rng = random.Random(0)
    train_rows = [synthetic_problem(rng, i) for i in range(8)]
    model, tokenizer = prm_model(tiny_model_dir)
    losses = train_prm(model, tokenizer, train_rows, steps=60)
    directory = tmp_path_factory.mktemp("prm-run")
    save_adapter(model, "prm", directory / "prm")  # laid out like a prime-trl output dir: <dir>/prm
    return directory, losses


def test_prm_training_lowers_the_loss(trained_prm):
    _, losses = trained_prm
    assert losses[-1] < 0.2 * losses[0]


def test_score_cli_reranks_better_than_random_and_majority(trained_prm, tiny_model_dir, tmp_path, capsys):
    prm_dir, _ = trained_prm
    rng = random.Random(1)  # held-out problems, never trained on
    rows = [synthetic_problem(rng, i) for i in range(8)]
    data = tmp_path / "candidates.jsonl"
    with open(data, "w") as handle:
        for row in rows:
            row = dict(row)
            del row["labels"]  # graded by the math verifier from the 'answer' column instead
            handle.write(json.dumps(row) + "\n")

    out = tmp_path / "score"
    code = main(
        [
            "score",
            "--prm",
            str(prm_dir),
            "--model",
            tiny_model_dir,
            "--data",
            str(data),
            "--output_dir",
            str(out),
            "--beta",
            str(BETA),
            "--step_split",
            r"\. ",
        ]
    )
    assert code == 0
    summary = json.loads((out / "rerank.json").read_text())
    accuracy = summary["accuracy"]
    assert summary["num_problems"] == 8 and summary["candidates_per_problem"] == 4
    assert accuracy["random"] == pytest.approx(0.25)  # exact expectation: one correct of four everywhere
    assert accuracy["majority_vote"] == 0.0  # the duplicated wrong answer wins every vote
    assert accuracy["prm_rerank"] > accuracy["random"]
    assert accuracy["prm_rerank"] >= 0.75
    printed = capsys.readouterr().out
    assert "implicit PRM (best-of-N)" in printed and "random choice" in printed

    records = [json.loads(line) for line in open(out / "rewards.jsonl")]
    assert len(records) == 8 * 4
    for record in records:
        assert sum(record["step_rewards"]) == pytest.approx(record["reward"], abs=1e-5)
        assert record["label"] in (0.0, 1.0)
    correct = [r["reward"] for r in records if r["label"] == 1.0]
    wrong = [r["reward"] for r in records if r["label"] == 0.0]
    assert sum(correct) / len(correct) > sum(wrong) / len(wrong)
    page = (out / "rewards.html").read_text()
    assert page.count("class='response'") == 32 and "class='tok'" in page


# ----- what the rewards mean: EOS, steps, votes ---------------------------------------------------------------


def straddling_tokenizer():
    """Byte-level BPE whose token "\\nb" straddles a newline cut (vocabulary as large as the tiny model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)} | {"Ċb": 256, "</s>": 257, "<pad>": 258}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


def test_steps_are_the_text_their_rewards_are_summed_over(tiny_model_dir):
    model, _ = prm_model(tiny_model_dir)
    for name, param in model.named_parameters():
        if ".prm." in name:
            param.data.normal_(0, 0.3)
    tokenizer = straddling_tokenizer()
    (scored,) = score_responses(model, tokenizer, ["Q:"], ["a\nb\nc"], step_split="newline", progress=False)
    assert scored.tokens == ["a", "\nb", "\n", "c", ""]  # "\nb" straddles the cut after the first newline
    for step, (a, b), reward in zip(scored.steps, scored.step_spans, scored.step_rewards):
        assert step == "".join(scored.tokens[a:b])
        assert reward == pytest.approx(sum(scored.token_rewards[a:b]), abs=1e-7)
    assert "".join(scored.steps) == scored.text and all(scored.steps)


def test_action_steps_start_only_at_markers_that_open_a_line():
    text = "[ASSESS]\n\nWe need 2+3.\n\nNext action: [ADVANCE]\n\n[ADVANCE]\n\n2+3=5.\n\nNext action: [OUTPUT]\n\n[OUTPUT]\n\n\\boxed{5}"
    steps = pieces(text, "action")
    assert [s.split("\n")[0] for s in steps] == ["[ASSESS]", "[ADVANCE]", "[OUTPUT]"]
    assert steps[0].endswith("Next action: [ADVANCE]\n\n") and "".join(steps) == text


def test_finished_field_decides_the_eos_and_answer_zero_is_graded(trained_prm, tiny_model_dir, tmp_path):
    """A cut-off response (finished false, as `prime-trl eval` writes it) is scored without an EOS even though
    --append_eos is true; a problem whose answer is 0 is graded and reranked."""
    prm_dir, _ = trained_prm
    rows = [
        {
            "id": "zero",
            "mode": "sample",
            "prompt": "Q: 3-3?",
            "answer": 0,
            "task": "math",
            "completion": c,
            "finished": f,
        }
        for c, f in (("\\boxed{0}", True), ("\\boxed{1}", True), ("\\boxed{0} and then more te", False))
    ] + [{"id": "zero", "mode": "greedy", "prompt": "Q: 3-3?", "answer": 0, "completion": "x", "finished": True}]
    data = tmp_path / "predictions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = ["score", "--prm", str(prm_dir), "--model", tiny_model_dir, "--data", str(data), "--output_dir", str(out)]
    assert main([*args, "--append_eos", "true"]) == 0
    records = [json.loads(line) for line in open(out / "rewards.jsonl")]
    assert [r["tokens"][-1] == "" for r in records] == [True, True, False]
    assert "".join(records[2]["tokens"]) == rows[2]["completion"]
    assert [r["label"] for r in records] == [1.0, 0.0, 1.0]
    assert json.loads((out / "rerank.json").read_text())["num_problems"] == 1


def test_prm_weighted_vote_merges_like_majority_vote_and_never_overflows():
    def scored(reward):
        return ScoredResponse("", [], [], [], [], [], reward)

    answers = ["\\frac{1}{2}", "0.5", "3", "3", "\\frac12"]
    correct = [1.0, 1.0, 0.0, 0.0, 1.0]
    problem = Problem("p", "Q", [Candidate(f"\\boxed{{{a}}}", c, a) for a, c in zip(answers, correct)])

    def equivalent(preds, golds):
        value = {"\\frac{1}{2}": 0.5, "0.5": 0.5, "\\frac12": 0.5, "3": 3.0}
        return [value[p] == value[g] for p, g in zip(preds, golds)]

    untrained = rerank([problem], [[scored(0.0)] * 5], equivalent=equivalent)["accuracy"]
    assert untrained["prm_weighted_vote"] == untrained["majority_vote"] == 1.0  # the halves merge: 3 votes to 2
    rewards = [-2000.0, -1000.0, 800.0, -50.0, -3000.0]  # exp(2000) overflows a float
    summary = rerank([problem], [[scored(r) for r in rewards]], equivalent=equivalent)
    assert summary["accuracy"]["prm_weighted_vote"] == 0.0  # "3" carries all the weight
    assert summary["choices"][0]["chosen"] == 2


def test_fused_scoring_equals_full_logits_and_prompts_get_one_bos(trained_prm, tiny_model_dir):
    from prime_trl.apps.scoring import implicit_rewards, load_prm

    prm_dir, _ = trained_prm
    model, tokenizer = load_prm(prm_dir, tiny_model_dir, dtype="float32", device="cpu")
    prompts = ["Q: 1+1?", [{"role": "user", "content": "What is 2+2?"}]]
    responses = ["\\boxed{2}", "It is 4.\n\\boxed{4}"]
    fused = implicit_rewards(model, tokenizer, prompts, responses, beta=BETA, fused=True)
    full = implicit_rewards(model, tokenizer, prompts, responses, beta=BETA, fused=False)
    for (ids_a, a), (ids_b, b) in zip(fused, full):
        assert ids_a == ids_b and torch.allclose(a, b, atol=1e-5) and a.abs().max() > 0

    bos = bos_tokenizer()
    batch = encode_responses(bos, prompts, ["4", "5"], append_eos=[True, False])
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)]
    assert rows == [trl_prompt_ids(bos, [p])[0] for p in prompts]
    assert [row.count(bos.bos_token_id) for row in rows] == [1, 1]
    assert batch.completion_mask.sum(-1).tolist() == [2, 1]  # EOS only after the finished response


@pytest.mark.parametrize(
    "lines, expected",
    [
        (
            ['{"prompt": "Q", "response": "a"}', '{"prompt": "Q", "response": "b"}', '{"prompt": "Q", "resp'],
            ":3: not valid JSON",
        ),
        (['["Q", "a"]'], ":1: a JSON list, not an object"),
        (['{"prompt": "Q", "responses": "bc"}'], ":1: 'responses' must be a list of strings"),
        (['{"prompt": "Q", "responses": ["a", "b"], "labels": [1]}'], ":1: 1 'labels' for 2 responses"),
        (['{"prompt": "Q", "responses": ["a"], "labels": ["yes"]}'], ":1: 'labels' must be a number"),
        (['{"prompt": "Q", "completion": "a", "mode": "greedy"}'], "all greedy completions"),
        (['{"prompt": "", "response": "a"}'], ":1: 'prompt' must be a non-empty string"),
        (['{"prompt": [{"text": "Q"}], "response": "a"}'], ":1: 'prompt' messages must be objects"),
        ([], "no non-empty line"),
        (None, "no such file"),
    ],
)
def test_malformed_response_files_fail_with_one_line_naming_the_line(lines, expected, tmp_path, capsys):
    data = tmp_path / "responses.jsonl"
    if lines is not None:
        data.write_text("\n".join(lines) + "\n")
    code = main(["score", "--prm", str(tmp_path / "never-loaded"), "--data", str(data)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and str(data) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_null_labels_mean_unlabelled(tmp_path):
    from prime_trl.apps.scoring import load_problems

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "responses": ["\\boxed{0}", "\\boxed{2}"], "labels": None, "answer": 0}))
    (problem,) = load_problems(data)
    assert [c.label for c in problem.candidates] == [1.0, 0.0]  # graded against the answer 0


def test_eval_rows_vote_with_the_answer_their_grader_read(tmp_path):
    """Predictions of `prime-trl eval --reward final_answer` (plain-text answers, no box): the majority vote uses
    their `extracted_answer`, not a missing \\boxed{}; rows without one still vote by their last box."""
    from prime_trl.apps.scoring import load_problems

    data = tmp_path / "predictions.jsonl"
    eval_row = {"id": "a", "prompt": "Q", "task": "math", "answer": "7", "mode": "sample"}
    rows = [
        {**eval_row, "completion": "3 + 4 = 7.", "extracted_answer": "7", "correct": True},
        {**eval_row, "completion": "It is 8", "extracted_answer": "8", "correct": False},
        {"id": "b", "prompt": "R", "completion": "so \\boxed{5}", "answer": "5"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second = load_problems(data)
    assert [c.answer for c in first.candidates] == ["7", "8"]
    assert [c.answer for c in second.candidates] == ["5"] and second.candidates[0].label == 1.0


def test_prm_trained_on_a_4bit_base_is_scored_on_the_same_4bit_base(tmp_path):
    """`--load_in_4bit` loads the base as `prime-trl train --load_in_4bit` does (TRL's quantization config, the
    trainable 4-bit layout), so the rewards are the ones training computed; unquantized they differ."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from trl import ModelConfig, get_quantization_config

    from prime_trl.apps.scoring import ScoreArguments, implicit_rewards, load_prm, quantization_config_for
    from prime_trl.tiny import save_tiny_model
    from prime_trl.trainer.quantization import is_quantized, protect_4bit_base

    model_dir = str(save_tiny_model(tmp_path / "base", hidden_size=128))  # 64-wide quantisation blocks
    model, _ = prm_model(model_dir)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if ".prm." in name:
            param.data.normal_(0, 0.1)
    save_adapter(model, "prm", tmp_path / "run" / "prm")

    # As training holds it: TRL's 4-bit config from the train flags, the trainable layout, the adapter on top.
    quantization = get_quantization_config(ModelConfig(load_in_4bit=True))
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, device_map={"": "cpu"})
    protect_4bit_base(base)
    training = PeftModel.from_pretrained(base, str(tmp_path / "run" / "prm"), adapter_name="prm").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, responses = ["Q: 1+1?", "Q: 2+5?"], ["It is 2. \\boxed{2}", "\\boxed{8}"]
    expected = implicit_rewards(training, tokenizer, prompts, responses, beta=BETA)

    args = ScoreArguments(prm=str(tmp_path / "run"), data="x.jsonl", load_in_4bit=True)
    scoring, _ = load_prm(args.prm, model_dir, device="cpu", quantization_config=quantization_config_for(args))
    assert is_quantized(scoring)
    got = implicit_rewards(scoring, tokenizer, prompts, responses, beta=BETA, fused=True)
    unquantized, _ = load_prm(args.prm, model_dir, device="cpu")
    plain = implicit_rewards(unquantized, tokenizer, prompts, responses, beta=BETA, fused=True)
    for (_, want), (_, have), (_, full) in zip(expected, got, plain):
        assert torch.allclose(have, want, atol=1e-5)
        assert not torch.allclose(full, want, atol=1e-4)


def test_best_of_n_rankings_do_not_depend_on_beta(trained_prm, tiny_model_dir):
    """--beta scales every token reward, so every aggregate ranks the candidates the same at any beta."""
    from prime_trl.apps.scoring import AGGREGATIONS, load_prm

    prm_dir, _ = trained_prm
    model, tokenizer = load_prm(prm_dir, tiny_model_dir, dtype="float32", device="cpu")
    rng = random.Random(2)
    row = synthetic_problem(rng, 0)
    problem = Problem(
        row["id"], row["prompt"], [Candidate(r, label) for r, label in zip(row["responses"], row["labels"])]
    )

    def choices(beta):
        scored = score_responses(
            model,
            tokenizer,
            [row["prompt"]] * 4,
            row["responses"],
            beta=beta,
            step_split=r"\. ",
            progress=False,
            fused=True,
        )
        return {how: rerank([problem], [scored], how)["choices"][0]["chosen"] for how in AGGREGATIONS}

    assert choices(BETA) == choices(0.05) == choices(5.0)
