"""Per-data-set image AUC and false-accusation counts from a `forensics eval` metrics.json:

    python -m benchmarks.by_dataset reports/eval-test-cifake-ai_playground/metrics.json [expert ...]

(`forensics eval` reports the pooled figures; a set such as cifake + ai_playground needs them apart.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from assistant.metrics import roc_auc

POSITIVE = {"manipulated", "ai_generated", "deepfake_face"}


def main(argv: list[str]) -> None:
    metrics = json.loads(Path(argv[0]).read_text())
    names = argv[1:] or ["fused"]
    images = metrics["images"]
    for dataset in sorted({row["dataset"] for row in images}):
        rows = [row for row in images if row["dataset"] == dataset]
        labels = [row["label"] in POSITIVE for row in rows]
        parts = [f"{dataset} ({sum(labels)} fake / {len(labels) - sum(labels)} real)"]
        for name in names:
            scores = [row["scores"].get(name) or 0.0 for row in rows]
            auc = roc_auc(labels, scores) if 0 < sum(labels) < len(labels) else float("nan")
            flagged = sum(1 for s, y in zip(scores, labels, strict=True) if not y and s > 0.65)
            parts.append(f"{name}: AUC {auc:.3f}, real ones above 0.65: {flagged}")
        print("; ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
