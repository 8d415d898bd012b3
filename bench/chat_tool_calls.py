"""How often the offline chat makes a real tool call: N prompts "Tokenize samples/<image> with <checkpoint>
and tell me the grid size", run by the local SmolLM2 backend with --yes.

A success is a call of tokenize-image that ran and exited 0 (the real command, on the real image);
the summary also counts answers that state the grid. There is no reference implementation to
compare with: this is the rate the issue asks for.

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
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    from dsfuse.agent.local import LocalBackend
    from dsfuse.agent.loop import Agent, Transcript
    from dsfuse.agent.tools import build_tools
    from dsfuse.cli.common import print_table

    images = sorted(str(p) for p in Path(args.samples).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not images:
        raise SystemExit(f"no images under {args.samples}")
    backend = LocalBackend.load(device="cpu", max_new_tokens=args.max_tokens)
    tools = build_tools()
    rows, called, ran, grid_told = [], 0, 0, 0
    started = time.perf_counter()
    for i in range(args.prompts):
        image = images[i % len(images)]
        prompt = PHRASINGS[i % len(PHRASINGS)].format(image=image, ckpt=args.checkpoint)
        agent = Agent(backend, tools, Path.cwd(), Transcript(None, {}), max_rounds=1, result_chars=backend.result_chars)
        reply = agent.ask(prompt)
        calls = [c for c in reply.tool_calls if c["name"] == "tokenize-image"]
        ok = any(c["result"].get("exit_code") == 0 for c in calls)
        grids = [c["result"].get("output", {}).get("grid") for c in calls if isinstance(c["result"].get("output"), dict)]
        told = any(g and all(str(n) in reply.answer for n in g) for g in grids)
        called += bool(calls)
        ran += ok
        grid_told += told
        made = ", ".join(f"{c['name']}({c['arguments']})" for c in reply.tool_calls) or "no call"
        rows.append((i + 1, prompt[:60], made[:90], "yes" if ok else "no", reply.answer[:50]))
        print(f"{i + 1}/{args.prompts} {'ok' if ok else 'FAIL'}: {made[:120]}", flush=True)
    print_table("offline chat: tool calls over the prompts", ["#", "prompt", "call", "ran ok", "answer"], rows)
    n = args.prompts
    print_table("summary", ["what", "count", "rate"], [
        ("called tokenize-image", called, f"{called / n:.0%}"),
        ("real call that exited 0", ran, f"{ran / n:.0%}"),
        ("answer states the grid", grid_told, f"{grid_told / n:.0%}"),
        ("seconds per prompt", round((time.perf_counter() - started) / n, 1), ""),
    ])


if __name__ == "__main__":
    main()
