"""Print a run's metrics.jsonl as a table (used at the end of `make demo`)."""

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        print(f"{path}: no epochs recorded", file=sys.stderr)
        return 1
    cols = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "samples_per_s"]
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>13.4g}" if isinstance(v, float) else f"{v!s:>13}")
        print(" ".join(cells))
    last = rows[-1]
    print(f"final val_auc: {last.get('val_auc')}  ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/metrics.jsonl"))
