"""How often a pre-drafting branch would guess the verify's correction (docs/design.md, section
8): along the target's own greedy continuation of each prompt, at every position where the
draft's likeliest token is not the target's, whether the draft's second (and third) likeliest
is. A branch guesses the correction as the draft's likeliest token other than the rejected
one, so the second-choice rate is the share of its outcomes it could serve.

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


def guess_rates(target, draft, prompt_ids: list[list[int]], max_tokens: int) -> dict:
    """Counts over every prompt's greedy continuation by the target."""
    import torch

    counts = {"positions": 0, "draft_wrong": 0, "second_right": 0, "third_right": 0}
    for ids in prompt_ids:
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = target.generate(prompt, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
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
            "third_rate": counts["third_right"] / wrong if wrong else None}


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
    result = guess_rates(target, draft, tokenize(prompts, config), args.max_tokens)
    rate = lambda r: "-" if r is None else f"{r:.0%}"  # noqa: E731
    print(f"{config.model.draft} drafting for {config.model.target}, {len(prompts)} prompts x {args.max_tokens} "
          f"greedy tokens of the target")
    print(f"positions {result['positions']}, draft's first choice not the target's at {result['draft_wrong']}: "
          f"its second choice is at {result['second_right']} ({rate(result['second_rate'])}), "
          f"its third at {result['third_right']} ({rate(result['third_rate'])})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "num_prompts": len(prompts), "max_tokens": args.max_tokens, **result}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
