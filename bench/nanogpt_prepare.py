"""The baseline of the data suite: a jsonl corpus prepared the way nanoGPT's
`data/openwebtext/prepare.py` does it, written here from its description (not its code).

Method (nanoGPT's): `datasets.load_dataset("json")` reads the file into the datasets cache as Arrow;
`train_test_split(test_size=0.0005, seed=2357)`; `Dataset.map(num_proc=N)` tokenizes every document
with the GPT-2 encoding (`encode_ordinary` plus the end-of-text token) into a cached column of ids;
then each split is concatenated into one headerless uint16 `<split>.bin` memmap, written in 1024
contiguous batches. The GPT-2 encoding is the package's own offline one (identical ids), and the
datasets cache lives under the output directory so that its disk use can be measured.

    python bench/nanogpt_prepare.py corpus.jsonl out/ --num-proc 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", help="a JSON Lines file with a 'text' field")
    p.add_argument("out", help="output directory (train.bin, val.bin and the datasets cache)")
    p.add_argument("--num-proc", type=int, default=2)
    args = p.parse_args(argv)

    import numpy as np
    from datasets import load_dataset

    from gpt.tokenizer import _gpt2_encoding

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = _gpt2_encoding()
    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=args.jsonl, split="train", cache_dir=str(out / "hf-cache"),
                      num_proc=args.num_proc)
    split = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")

    def tokenize(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=args.num_proc)
    counts = {}
    for name, dset in tokenized.items():
        n = int(np.sum(dset["len"], dtype=np.uint64))
        arr = np.memmap(out / f"{name}.bin", dtype=np.uint16, mode="w+", shape=(n,))
        i = 0
        batches = min(1024, len(dset))
        for b in range(batches):
            part = dset.shard(num_shards=batches, index=b, contiguous=True).with_format("numpy")
            ids = np.concatenate(part["ids"])
            arr[i:i + len(ids)] = ids
            i += len(ids)
        arr.flush()
        counts[name] = n
    print(json.dumps({"tokens": sum(counts.values()), "splits": counts,
                      "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
