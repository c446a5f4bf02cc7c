"""Which BOS policy makes a model recall facts best: the number of known_1000 facts whose
answer (first token) is the model's top-1 next token, with and without the BOS token
prepended, on the same prompts in one run. The built-in models' ``prepend_bos``
(:mod:`interp_edit._builtin`) is the winner; README cites the output.

    python analyses/bos_policy.py --model gemma-3-270m --n 300
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import interp_edit as ie
from interp_edit.models import Model
from interp_edit.tracing.dataset import predicted_facts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="ie.load_model name or path (default model)")
    ap.add_argument("--data", type=Path, default=DATA / "known_1000.json")
    ap.add_argument("--n", type=int, default=300, help="the first N facts")
    args = ap.parse_args()
    model = ie.load_model(args.model)
    facts = ie.load_known_facts(args.data)[: args.n]
    print(f"{model.name}: known_1000, first {len(facts)} facts; the model's own policy is "
          f"prepend_bos={model.prepend_bos}")
    for bos in (True, False):
        t0 = time.perf_counter()
        m = Model(model.bridge, model.tokenizer, model.name, prepend_bos=bos)
        kept, _ = predicted_facts(m, facts, batch_size=16)
        print(f"prepend_bos={bos!s:5}: {len(kept)} of {len(facts)} top-1 "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
