"""Builds the compact PAPI files shipped in palign_jax/data/files/ from ../shared/papi.

Run once by maintainers (the output is committed):
    python scripts/import_papi.py /work/shared/papi
The IPIP items are public domain (IPIP_Permission.pdf); the subject answers and
P² descriptions are the PAPI benchmark's published test set.
"""

import csv
import gzip
import json
import pathlib
import shutil
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "palign_jax" / "data" / "files"


def main(source: str) -> None:
  src = pathlib.Path(source)
  OUT.mkdir(parents=True, exist_ok=True)
  shutil.copy(src / "ipip_neo_300_items.csv", OUT / "ipip_neo_300_items.csv")
  shutil.copy(src / "mpi_300_split.json", OUT / "mpi_300_split.json")
  subjects = json.loads((src / "Test-set.json").read_text())
  with open(OUT / "papi_subjects.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "sex", "age", "country"] + [f"i{j}" for j in range(1, 301)])
    for s in subjects:
      writer.writerow([s["case"], s["sex"], s["age"], s["country"]]
                      + [s[f"i{j}"] for j in range(1, 301)])
  prompts = json.loads((src / "personality_prompt.json").read_text())
  descriptions = {str(s["case"]): p["output"][0] for s, p in zip(subjects, prompts, strict=True)}
  with gzip.open(OUT / "papi_descriptions.json.gz", "wt", encoding="utf-8") as f:
    json.dump(descriptions, f, ensure_ascii=False)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "../shared/papi")
