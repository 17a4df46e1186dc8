"""Stream an answer from a causal-LM adapter served by `peftkit serve`, through OpenAI's own client
library (nothing peftkit-specific on this side).

    peftkit serve --adapter sent=runs/smollm2-sentiment-lora/adapter --api-key KEY &
    python examples/openai_chat.py --model sent --api-key KEY "A moving, funny film."

By default the text goes to /v1/completions, which puts it through the adapter's own prompt
format (the prompt template it was trained with, its system prompt and chat template): the answer
is the one `peftkit generate --prompt TEXT` gives. `--chat` sends it as a chat message as it is,
the way a general chat client would.
"""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("text")
parser.add_argument("--model", required=True, help="an adapter name (or the base's id: GET /v1/models)")
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--chat", action="store_true", help="send the text as a chat message, as it is")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
if args.chat:
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": args.text}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
    )
    pieces = (chunk.choices[0].delta.content for chunk in stream if chunk.choices)
else:
    stream = client.completions.create(
        model=args.model, prompt=args.text, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    pieces = (chunk.choices[0].text for chunk in stream if chunk.choices)
for piece in pieces:
    if piece:
        print(piece, end="|", flush=True)  # '|' shows where each piece ended
print()
