"""Speed of the embedded backend: cold start, tokens per second, peak memory.

    python benchmarks/embedded_backend.py [--dtype float32|bfloat16] [--threads N] [--tokens 128]

Run it after the cache exists (any first use of the embedded model makes it), in a fresh process so
the cold start includes the imports. Targets (issue "The assistant", item 1): ready in <= 15 s,
>= 15 tokens/s on 2 cores, peak RSS <= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per timed reply")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from assistant.backends import Message, load_backend

    backend = load_backend(dtype=args.dtype)
    ready = time.perf_counter() - START
    question = [
        Message("user", "Explain step by step how error level analysis finds edited regions in a JPEG.")
    ]
    backend.generate(question, max_new_tokens=8)  # warm-up: first-call allocations
    rates = []
    for _ in range(args.repeats):
        pieces: list[str] = []
        began = time.perf_counter()
        reply = backend.generate(question, max_new_tokens=args.tokens, on_token=pieces.append)
        seconds = time.perf_counter() - began
        rates.append(backend.count_tokens(reply) / seconds)
    result = {
        "cold_start_s": round(ready, 2),
        "tokens_per_s": round(sorted(rates)[len(rates) // 2], 1),
        "tokens_per_s_all": [round(r, 1) for r in rates],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
        "dtype": backend.info.details["dtype"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
