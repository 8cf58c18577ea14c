"""Print conversations as tokens with their labels: what the model is trained on, exactly.

    python tools/inspect_data.py --model pretrained/tiny/model --data data/demo/files/train.jsonl -n 3

Trained tokens show in green (or between ⟦ ⟧ when not on a terminal); --table lists every token
with its id and a ✓ when it is trained.
"""

import argparse
import sys

from chatkit.conversation import ConversationError
from chatkit.inspection import InspectionError, check_data, inspect_file, load_tokenizer, template_for
from chatkit.io import read_meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model or tokenizer folder")
    p.add_argument("--data", required=True, help="conversation JSONL")
    p.add_argument("--template", help="chat template (default: the model folder's, else openchatkit)")
    p.add_argument("-n", type=int, default=3, help="conversations to show")
    p.add_argument("--skip", type=int, default=0, help="conversations to skip first")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--overlong", choices=["drop", "truncate"], default="drop")
    p.add_argument("--table", action="store_true", help="one line per token with id and label")
    args = p.parse_args()
    try:  # a missing or bad input is one line; a bad line of --data stops there, naming file:line: field
        check_data(args.data)
        tokenizer = load_tokenizer(args.model)
        name = args.template or read_meta(args.model).get("template", "openchatkit")
        color = sys.stdout.isatty()
        for line in inspect_file(
            tokenizer,
            template_for(name, tokenizer),
            args.data,
            args.n,
            args.skip,
            args.max_length,
            args.overlong,
            color,
            args.table,
        ):
            print(line, flush=True)
    except (InspectionError, ConversationError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
