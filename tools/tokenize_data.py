"""Tokenize a recipe's data into the cache its training run reads, before (or without) launching it.

    python tools/tokenize_data.py config/tiny.yaml
    python tools/tokenize_data.py config/oig.yaml cache_dir=/shared/cache train_files=[data/x.jsonl] max_length=2048

The recipe and `key=value` overrides are read as chatkit.launch reads them; the files are tokenized
with the recipe's model tokenizer, template, max_length, overlong and method (DPO reads pairs), in
tokenize_procs processes, into cache_dir. chatkit.launch does the same before the ranks start: this
runs it on its own, e.g. on one node for a cache that every node shares, or while GPUs are busy.
Files already cached are skipped. A bad line stops with one `error:` line (exit status 1).
"""

import argparse
import sys

from chatkit.config import ConfigError, config_error, read_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe, e.g. config/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value settings, as for chatkit.launch")
    args = p.parse_args()
    try:
        cfg, invalid, _ = read_config(args.recipe, args.overrides, check_files=False)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if invalid:
        sys.exit(f"error: {config_error(args.recipe, invalid)}")
    from chatkit.train.context import RunError
    from chatkit.train.data import prepare_data

    try:
        lines = prepare_data(cfg)
    except RunError as e:
        sys.exit(f"error: {e}")
    for line in lines:
        print(line)
    files = len(set(cfg.train_files + cfg.val_files))
    print(f"{len(lines)} file(s) tokenized, {files - len(lines)} already in the cache")


if __name__ == "__main__":
    main()
