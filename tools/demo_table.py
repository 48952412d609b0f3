"""Print a table of memexport scores against the original resmem 1.1.6 reference scores."""

import csv
import json
import sys
from pathlib import Path

scores_csv, reference_json = Path(sys.argv[1]), Path(sys.argv[2])
reference = json.loads(reference_json.read_text())
rows = {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(open(scores_csv, encoding="utf-8"))}
print(f"{'image':24} {'memexport':>10} {'resmem 1.1.6':>12} {'abs err':>9}")
worst = 0.0
for name in sorted(reference):
    if name in rows:
        error = abs(rows[name] - reference[name])
        worst = max(worst, error)
        print(f"{name:24} {rows[name]:>10.6f} {reference[name]:>12.6f} {error:>9.1e}")
print(f"max abs error {worst:.1e} over {len([n for n in reference if n in rows])} images (target <= 1e-4)")
sys.exit(0 if worst <= 1e-4 else 1)
