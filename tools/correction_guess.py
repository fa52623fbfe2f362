"""How often a pre-drafting branch would guess the verify's correction (docs/design.md, section
8): along the target's own greedy continuation of each prompt, at every position where the
draft's likeliest token is not the target's, whether the draft's second (and third) likeliest
is. A branch guesses the correction as the draft's likeliest token other than the rejected
one, so the second-choice rate is the share of its outcomes it could serve.

Then the steps of greedy speculative decoding along the same continuations (k drafts a step,
the scheduler's num_draft): how many a pre-draft would have found ready if it grew the chain
alone (every draft accepted, the bonus the draft's likeliest token), each step's likeliest
outcome as the drafter weighs them (workers/drafter.py _choose_paths, with the guess's prior
rate), its two or four likeliest, or any of the chain and the branches (one per kept draft and
correction guess: the draft's NUM_ALTS likeliest other tokens); and how often the bonus was the
chain's guess where every draft was accepted.

    python tools/correction_guess.py --config default --num-prompts 8 --max-tokens 48
    python tools/correction_guess.py --config tiny --num-prompts 4 --max-tokens 16

Table on stdout, JSON with --out. transformers models, as tools/bench_hf.py loads them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_hf import load_hf_model, tokenize  # noqa: E402
from loadtest import DEFAULT_PROMPTS, load_prompts  # noqa: E402

from minedraft.common.config import ConfigError, load_config  # noqa: E402
from minedraft.workers.drafter import NUM_ALTS  # noqa: E402


def guess_rates(target, draft, prompt_ids: list[list[int]], max_tokens: int) -> dict:
    """Counts over every prompt's greedy continuation by the target."""
    import torch

    counts = {"positions": 0, "draft_wrong": 0, "second_right": 0, "third_right": 0}
    outputs = []
    for ids in prompt_ids:
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = target.generate(prompt, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
            outputs.append(out[0, prompt.shape[1]:].tolist())
            start = prompt.shape[1] - 1
            best = target(out).logits[0, start:-1].argmax(-1)  # [n] the target's token at each output position
            top = draft(out).logits[0, start:-1].topk(3, -1).indices  # [n, 3] the draft's three likeliest
        wrong = top[:, 0] != best
        counts["positions"] += len(best)
        counts["draft_wrong"] += int(wrong.sum())
        counts["second_right"] += int((top[wrong, 1] == best[wrong]).sum())
        counts["third_right"] += int((top[wrong, 2] == best[wrong]).sum())
    wrong = counts["draft_wrong"]
    return {**counts, "second_rate": counts["second_right"] / wrong if wrong else None,
            "third_rate": counts["third_right"] / wrong if wrong else None, "outputs": outputs}


def step_outcomes(draft, prompt_ids: list[list[int]], outputs: list[list[int]], k: int) -> dict:
    """Counts over the steps of greedy speculative decoding with k drafts along each output."""
    import torch

    from minedraft.workers.drafter import GUESS_PRIOR, weigh_outcomes

    def next_logp(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(draft(torch.tensor([ids])).logits[0, -1].float(), -1)

    counts = {"steps": 0, "chain": 0, "likeliest": 0, "likeliest_two": 0, "likeliest_four": 0, "any": 0,
              "all_accepted": 0}
    for prompt, out in zip(prompt_ids, outputs):
        p = 0
        while p < len(out) - 1:
            drafts, scores, alts = [], [], []  # scores: cumulative log-probability
            for _ in range(k):
                values, indices = next_logp(prompt + out[:p] + drafts).topk(1 + NUM_ALTS)
                drafts.append(int(indices[0]))
                scores.append((scores[-1] if scores else 0.0) + float(values[0]))
                alts.append([(int(t), float(v)) for t, v in zip(indices[1:], values[1:])])
            guess = int(next_logp(prompt + out[:p] + drafts).argmax())
            accepted = 0
            while accepted < k and p + accepted < len(out) and drafts[accepted] == out[p + accepted]:
                accepted += 1
            if p + accepted >= len(out):
                break
            token = out[p + accepted]  # the verify's bonus (every draft accepted) or correction
            weighed = [(weight, (accepted == k and guess == token) if at is None else (accepted == at and alt == token))
                       for weight, at, alt in weigh_outcomes(scores, alts, k, GUESS_PRIOR)]
            counts["steps"] += 1
            counts["chain"] += accepted == k and guess == token
            counts["likeliest"] += weighed[0][1]
            counts["likeliest_two"] += any(hit for _, hit in weighed[:2])
            counts["likeliest_four"] += any(hit for _, hit in weighed[:4])
            counts["any"] += any(hit for _, hit in weighed)
            counts["all_accepted"] += accepted == k
            p += accepted + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", help="write the counts as JSON here")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, [])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts)[: args.num_prompts]
    target = load_hf_model(config.model.target, config, False, "cpu")
    draft = load_hf_model(config.model.draft, config, True, "cpu")
    prompt_ids = tokenize(prompts, config)
    result = guess_rates(target, draft, prompt_ids, args.max_tokens)
    k = config.scheduler.num_draft
    steps = step_outcomes(draft, prompt_ids, result.pop("outputs"), k)
    rate = lambda r: "-" if r is None else f"{r:.0%}"  # noqa: E731
    print(f"{config.model.draft} drafting for {config.model.target}, {len(prompts)} prompts x {args.max_tokens} "
          f"greedy tokens of the target")
    print(f"positions {result['positions']}, draft's first choice not the target's at {result['draft_wrong']}: "
          f"its second choice is at {result['second_right']} ({rate(result['second_rate'])}), "
          f"its third at {result['third_right']} ({rate(result['third_rate'])})")
    n = steps["steps"]
    share = lambda c: f"{c} ({c / n:.0%})" if n else str(c)  # noqa: E731
    print(f"steps with k = {k} drafts: {n}; ready from a pre-draft of the chain alone {share(steps['chain'])}, "
          f"of the likeliest outcome {share(steps['likeliest'])}, of the two likeliest "
          f"{share(steps['likeliest_two'])}, of the four likeliest {share(steps['likeliest_four'])}, of any of the "
          f"chain and the {k * NUM_ALTS} branches {share(steps['any'])}")
    print(f"every draft accepted at {steps['all_accepted']} steps, the bonus the chain's guess at {steps['chain']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "num_prompts": len(prompts), "max_tokens": args.max_tokens, **result,
                       "num_draft": k, "step_outcomes": steps}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
