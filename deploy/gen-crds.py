#!/usr/bin/env python3
"""Write the Helm chart's CRDs from the typed API models (``shoal.api.crd``).

    .venv/bin/python deploy/gen-crds.py          # (re)write charts/shoal/crds/*.shoal.dev.yaml
    .venv/bin/python deploy/gen-crds.py --check  # exit 1 if the checked-in file is stale

The output is checked in; ``tests/unit/test_crd.py`` fails when it drifts from the models. kopf's
peering CRDs (``crds/kopf-peering.yaml``) are kopf's own and are not generated here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shoal.api.crd import (
    LORA_CRD_FILE,
    MODEL_CRD_FILE,
    lora_adapter_crd,
    model_crd,
    render_yaml,
)
from shoal.api.reference import lora_adapter_reference_markdown, model_reference_markdown

CRDS_DIR = Path(__file__).resolve().parents[1] / "charts" / "shoal" / "crds"
REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "model-reference.md"
LORA_REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "loraadapter-reference.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out-dir", type=Path, default=CRDS_DIR, help="default: the chart's crds/")
    args = parser.parse_args()
    outputs = {
        args.out_dir / MODEL_CRD_FILE: render_yaml(model_crd()),
        REFERENCE: model_reference_markdown(),
        args.out_dir / LORA_CRD_FILE: render_yaml(lora_adapter_crd(), "shoal/api/lora.py"),
        LORA_REFERENCE: lora_adapter_reference_markdown(),
    }
    if args.check:
        stale = [p for p, text in outputs.items() if (p.read_text() if p.exists() else "") != text]
        for path in stale:
            print(f"{path} is stale: run deploy/gen-crds.py", file=sys.stderr)
        if not stale:
            print("CRD and reference are up to date")
        return 1 if stale else 0
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
