"""Stands in for pretrain.train in the Slurm tests (TRAIN_MODULE=tests.slurm.print_config): parses the
flags exactly as the training program does and prints one ``CONFIG {json}`` line per process with its
rank, world size and the settings it would train with; trains nothing."""
import json
import os
import sys

from pretrain.config import parse_config

if __name__ == "__main__":
    cfg = parse_config(sys.argv[1:])
    print("CONFIG " + json.dumps({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                                  "config": cfg.to_dict()}), flush=True)
