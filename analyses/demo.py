"""The main job of `make demo`: load the default model offline and show what it knows.

Later stages extend it: trace a fact, edit it with ROME, show before/after, write figures.
"""

from __future__ import annotations

import time

import interp_edit as ie

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "The Colosseum is located in the city of",
]


def main() -> None:
    t0 = time.perf_counter()
    model = ie.load_model()
    print(f"loaded {model.name} ({model.n_layers} layers, d_model {model.d_model}) "
          f"in {time.perf_counter() - t0:.1f}s")
    for prompt in PROMPTS:
        print(f"\n{prompt!r}")
        for tok, p in model.top_k(prompt, 5):
            print(f"  {p:6.3f}  {tok!r}")


if __name__ == "__main__":
    main()
