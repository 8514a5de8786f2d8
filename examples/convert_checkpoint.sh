#!/usr/bin/env bash
# Convert a checkpoint with the CLI and a YAML policy: the shipped ResNet-20 (a plain state_dict)
# with examples/policy_mixed.yaml, then check it in onnxruntime and time it side by side.
#   bash examples/convert_checkpoint.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
checkpoint="$(python -c 'import convfactor.zoo as z; print(z.pretrained_dir() / "resnet20_digits.pt")')"

# 128 held-out images to check on, 256 training images to calibrate with (tensors saved with torch.save).
python -c "import sys, torch; from convfactor.zoo.digits import load_digits_split as s, calibration_subset as c
torch.save(s('test')[0][:128], sys.argv[1]); torch.save(c(256)[0], sys.argv[2])" "$out/heldout.pt" "$out/calibration.pt"

convfactor inspect "$checkpoint" --arch convfactor.zoo.resnet:resnet20 --input-shape 1,3,32,32 --methods spatial_svd,tucker2
# --check on 128 held-out digits (real inputs; random ones only check the math), with tolerances for a
# lossy policy: top-1 agreement with the original must stay >= 90% (output 0 is declared as class scores).
convfactor convert "$checkpoint" --arch convfactor.zoo.resnet:resnet20 --input-shape 1,3,32,32 \
    --policy "$here/policy_mixed.yaml" --calibration "$out/calibration.pt" --out "$out/resnet20_mixed.pt" --onnx "$out/resnet20_mixed.onnx" \
    --check --check-inputs "$out/heldout.pt" --class-scores 0 --max-rel-l2 0.5 --min-cosine 0.9 --min-snr-db 5 --min-top1 0.9 \
    --bench --min-time 0.5 --force
python -c "import convfactor, sys; m = convfactor.load(sys.argv[1]); print('reloaded', type(m).__name__)" \
    "$out/resnet20_mixed.pt"
