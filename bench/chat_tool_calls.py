"""How often the offline chat makes a real tool call: N prompts "Tokenize samples/<image> with <checkpoint>
and tell me the grid size", run by the local SmolLM2 backend with --yes.

A success is a call of tokenize-image that ran and exited 0 (the real command, on the real image,
with the real checkpoint). Only the first assistant turn is generated: the call is what is counted.
There is no reference implementation to compare with: this is the rate the issue asks for.

    python bench/chat_tool_calls.py --checkpoint runs/vq --prompts 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PHRASINGS = [
    "Tokenize {image} with {ckpt} and tell me the grid size",
    "Please tokenize {image} using the checkpoint {ckpt}. What is the token grid size?",
    "What grid of tokens does {ckpt} give for {image}?",
    "Run the image tokenizer {ckpt} on {image} and report the grid size",
    "Tokenize the image {image} with {ckpt}; how big is the grid?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a VQ-VAE run dir or model.safetensors (relative to the cwd)")
    parser.add_argument("--samples", default="samples/images", help="folder of images, relative to the cwd")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from dsfuse.agent.local import LocalBackend
    from dsfuse.agent.loop import SYSTEM_PROMPT
    from dsfuse.agent.boundary import Boundary
    from dsfuse.agent.tools import build_tools, parse_arguments, run_tool, validate_arguments
    from dsfuse.report import print_table

    images = sorted(str(p) for p in Path(args.samples).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not images:
        raise SystemExit(f"no images under {args.samples}")
    backend = LocalBackend.load(device="cpu", max_new_tokens=args.max_tokens)
    tools = build_tools()
    specs = [tool.spec() for tool in tools.values()]
    system = {"role": "system", "content": SYSTEM_PROMPT.format(cwd=Path.cwd())}
    rows, called, ran = [], 0, 0
    started = time.perf_counter()
    for i in range(args.prompts):
        image = images[i % len(images)]
        prompt = PHRASINGS[i % len(PHRASINGS)].format(image=image, ckpt=args.checkpoint)
        # The first assistant turn decides and makes the call; the answer after it is not timed here.
        turn = backend.complete([system, {"role": "user", "content": prompt}], specs)
        call = turn.tool_calls[0] if turn.tool_calls else None
        result: dict = {}
        if call is not None and call.name == "tokenize-image":
            called += 1
            arguments = validate_arguments(tools[call.name], parse_arguments(call.arguments))
            result = run_tool(tools[call.name], arguments, Boundary.at(Path.cwd()))
            ran += result.get("exit_code") == 0
        output = result.get("output")
        grid = output.get("grid") if isinstance(output, dict) else None
        made = f"{call.name} {call.arguments}" if call else f"answered: {turn.content[:60]!r}"
        rows.append((i + 1, prompt[:58], made[:100], result.get("exit_code", ""), grid or result.get("error", "")))
        print(f"{i + 1}/{args.prompts} exit={result.get('exit_code')} {made[:140]}", flush=True)
    n = args.prompts
    print_table("offline chat: the first turn of each prompt", ["#", "prompt", "call", "exit", "grid"], rows)
    print_table("summary", ["what", "count", "rate"], [
        ("called tokenize-image", called, f"{called / n:.0%}"),
        ("real call that exited 0", ran, f"{ran / n:.0%}"),
        ("seconds per prompt", round((time.perf_counter() - started) / n, 1), ""),
    ])


if __name__ == "__main__":
    main()
