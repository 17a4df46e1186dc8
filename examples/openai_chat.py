"""Stream a chat answer from a causal-LM adapter served by `peftkit serve`, through OpenAI's own
client library (nothing peftkit-specific on this side).

    peftkit serve --adapter sent=runs/smollm2-sentiment-lora/adapter --api-key KEY &
    python examples/openai_chat.py --model sent --api-key KEY "A moving, funny film."
"""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("text")
parser.add_argument("--model", required=True, help="an adapter name (or the base's id: GET /v1/models)")
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
stream = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": args.text}],
                                        max_tokens=args.max_tokens, temperature=0, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="|", flush=True)  # '|' shows where each piece ended
print()
