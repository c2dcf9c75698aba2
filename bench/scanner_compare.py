"""tensafe's pickle scanner next to picklescan and fickling on the same files.

    .venv/bin/pip install picklescan fickling      # not test dependencies
    .venv/bin/python bench/scanner_compare.py

The hostile corpus is the one tensafe-pickle's tests build opcode by opcode
(one or more files per class of hostile input), written out with
TENSAFE_WRITE_CORPUS; the benign side is the bundled torch checkpoint and
fresh torch.save files. All three tools only parse: nothing here unpickles.
Prints each tool's verdict per file and every disagreement with tensafe.
"""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import torch

import tensafe

REPO = pathlib.Path(__file__).resolve().parents[1]


def picklescan_verdict(path: str) -> str:
    from picklescan.scanner import scan_file_path

    try:
        result = scan_file_path(path)
    except Exception:
        return "error"
    if result.scan_err:
        return "error"
    return "flagged" if result.issues_count or result.infected_files else "clean"


def fickling_verdict(path: str) -> str:
    import fickling

    try:
        if zipfile.is_zipfile(path):
            results = fickling.scan_zip_archive(path, graceful=True).values()
        else:
            results = [fickling.scan_file(path, graceful=True)]
    except Exception:
        return "error"
    return "clean" if all(r.is_safe for r in results) else "flagged"


def tensafe_verdict(path: str) -> str:
    verdict = tensafe.scan(path)["verdict"]
    return {"safe": "clean", "suspicious": "flagged", "dangerous": "flagged"}.get(verdict, verdict)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hostile = pathlib.Path(tmp) / "hostile"
        hostile.mkdir()
        subprocess.run(
            ["cargo", "test", "-q", "-p", "tensafe-pickle", "--test", "hostile"],
            cwd=REPO, env={**os.environ, "TENSAFE_WRITE_CORPUS": str(hostile)}, check=True, capture_output=True,
        )
        benign = pathlib.Path(tmp) / "benign"
        benign.mkdir()
        torch.save({"w": torch.randn(4, 4), "b": torch.zeros(4)}, benign / "zip.pt")
        torch.save({"w": torch.randn(4, 4)}, benign / "legacy.pt", _use_new_zipfile_serialization=False)
        (benign / "tiny_mlp.pt").write_bytes((REPO / "examples" / "tiny_mlp.pt").read_bytes())

        rows = []
        for kind, folder in (("benign", benign), ("hostile", hostile)):
            for path in sorted(folder.iterdir()):
                p = str(path)
                rows.append((kind, path.name, tensafe_verdict(p), picklescan_verdict(p), fickling_verdict(p)))

    width = max(len(r[1]) for r in rows)
    print(f"{'kind':<8} {'file':<{width}}  {'tensafe':<8} {'picklescan':<10} {'fickling':<8}")
    for row in rows:
        print(f"{row[0]:<8} {row[1]:<{width}}  {row[2]:<8} {row[3]:<10} {row[4]:<8}")
    print()
    for kind in ("benign", "hostile"):
        subset = [r for r in rows if r[0] == kind]
        for tool, column in (("tensafe", 2), ("picklescan", 3), ("fickling", 4)):
            counts = collections.Counter(r[column] for r in subset)
            print(f"{kind:<8} {tool:<11} " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print()
    for tool, column in (("picklescan", 3), ("fickling", 4)):
        missed = [r[1] for r in rows if r[0] == "hostile" and r[2] == "flagged" and r[column] != "flagged"]
        false_alarms = [r[1] for r in rows if r[0] == "benign" and r[column] == "flagged"]
        print(f"{tool}: does not flag {len(missed)} hostile files tensafe flags; flags {len(false_alarms)} benign files")
        for name in missed:
            print(f"    missed: {name}")
        for name in false_alarms:
            print(f"    false alarm: {name}")
    # Files the hostile tests write include their benign controls; "error"
    # (malformed, exit 2) and unsupported containers (exit 3) are not "clean".
    missed = [r[1] for r in rows if r[0] == "hostile" and r[2] == "clean"]
    print(f"tensafe: {len(missed)} files of the hostile corpus scanned clean" + ("".join(f"\n    {m}" for m in missed)))
    for tool, column in (("picklescan", 3), ("fickling", 4)):
        only = [r[1] for r in rows if r[0] == "hostile" and r[column] == "flagged" and r[2] == "clean"]
        print(f"{tool} flags {len(only)} of them" + ("".join(f"\n    {m}" for m in only)))


if __name__ == "__main__":
    sys.exit(main())
