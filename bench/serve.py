"""What the OpenAI API costs: one streamed chat completion through `swarm serve` vs `generate` in-process.

    python bench/serve.py [--new-tokens 128] [--reps 3] [--out bench/results/serve.json]

One local swarm (a DHT peer and 2 nodes on loopback, blocks 0:4 and 4:8 of the demo-size model:
a random 8-block Llama, hidden 512, vocab 4096, float32 on the CPU, with a word-level tokenizer
and a chat template built here), and on it, in one run, alternating `--reps` times:

(a) generate  DistributedModelForCausalLM.generate in this process, greedy, the chat template's
              prompt; timed from the call to its last token;
(b) serve     the same prompt as a streamed chat completion through a `swarm serve` process,
              read with the official `openai` client; timed from the request to the last chunk.

Both must give the same text. Tokens/s are medians; the last line is the ratio serve / generate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from swarm.client.model import DistributedModelForCausalLM
from swarm.demo import DEMO_CONFIG, build_checkpoint
from swarm.localswarm import LocalSwarm
from swarm.serve.text import TextModel

SPECIALS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [{"role": "user", "content": "w100 w200 w300 w400 w500 w600 w700 w800"}]


def add_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the whole vocabulary (token i >= 6 is `w{i}`) and a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), int(str(DEMO_CONFIG["vocab_size"])))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def time_generate(model: DistributedModelForCausalLM, ids: list[int], n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids]), n)
    return time.perf_counter() - start, [int(t) for t in out[0, len(ids) :]]


def time_serve(client: Any, n: int) -> tuple[float, str, int]:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="demo-model",
        messages=MESSAGES,
        max_tokens=n,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, tokens = "", 0
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, text, tokens


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(work / "demo-model")
        add_tokenizer(ckpt)
        text_model = TextModel(ckpt)
        ids = text_model.chat_ids(MESSAGES)
        with LocalSwarm(work / "swarm") as local:
            local.start_dht()
            local.start_node(ckpt, "0:4", "--throughput", "100")
            local.start_node(ckpt, "4:8", "--throughput", "100")
            server = local.start_command(
                "serve", "serve", "--model", str(ckpt), "--initial-peers", *local.initial_peers, "--port", "0"
            )
            with DistributedModelForCausalLM.from_pretrained(ckpt, local.initial_peers) as model:
                client = openai.OpenAI(base_url=f"{server.info['url']}/v1", api_key="none", max_retries=0)
                time_generate(model, ids, 8)  # warm both paths: connections, caches, first-call costs
                time_serve(client, 8)
                rows = run(model, client, ids, args.new_tokens, args.reps, text_model)
    report(rows, args.out)
    return 0


def run(model: Any, client: Any, ids: list[int], n: int, reps: int, text_model: TextModel) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"generate": [], "serve": []}
    for rep in range(reps):
        seconds, tokens = time_generate(model, ids, n)
        rates["generate"].append(len(tokens) / seconds)
        served_seconds, text, served_tokens = time_serve(client, n)
        rates["serve"].append(served_tokens / served_seconds)
        if text != text_model.decode(tokens) or served_tokens != len(tokens):
            raise SystemExit(f"rep {rep}: serve gave other tokens than generate")
        generate_rate, serve_rate = rates["generate"][-1], rates["serve"][-1]
        print(
            f"rep {rep}: generate {generate_rate:.1f} tokens/s, serve {serve_rate:.1f} tokens/s", flush=True
        )
    return {
        "new_tokens": n,
        "reps": reps,
        "generate_tokens_per_s": statistics.median(rates["generate"]),
        "serve_tokens_per_s": statistics.median(rates["serve"]),
        "all": rates,
    }


def report(rows: dict[str, Any], out: Path) -> None:
    ratio = rows["serve_tokens_per_s"] / rows["generate_tokens_per_s"]
    rows["ratio"] = ratio
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"generate in-process: {rows['generate_tokens_per_s']:.1f} tokens/s (median of {rows['reps']})")
    print(f"swarm serve, streamed chat: {rows['serve_tokens_per_s']:.1f} tokens/s")
    print(f"serve/generate tokens/s ratio: {ratio:.3f} (API cost {100 * (1 - ratio):.1f}%)")


if __name__ == "__main__":
    sys.exit(main())
